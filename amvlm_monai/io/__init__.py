"""Files in and out: safe checkpoint loading and atomic saves, ``model_info.json``, clinical image readers and writers."""
