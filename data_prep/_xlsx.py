"""Small .xlsx helpers (openpyxl): byte-reproducible writing and header-checked reading.

openpyxl stamps the save time into ``docProps/core.xml`` and into every zip entry, so two saves of the same table
differ. `write_xlsx` rewrites the archive with a fixed time so that the same rows always give the same bytes.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

from amvlm_monai.utils.errors import DataError

__all__ = ["write_xlsx", "read_xlsx"]

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_ISO = "2000-01-01T00:00:00Z"


def write_xlsx(path: str | Path, header: Sequence[str], rows: Sequence[Sequence], sheet: str = "Sheet1") -> Path:
    """Write one sheet (a header row, then ``rows``) to ``path``; same input -> same bytes."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = sheet
    ws.append(list(header))
    for row in rows:
        ws.append(list(row))
    raw = io.BytesIO()
    wb.save(raw)
    fixed = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(fixed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(
                    rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:\2>)",
                    lambda m: m.group(1) + _FIXED_ISO.encode() + m.group(3),
                    data,
                )
            out = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            out.compress_type = zipfile.ZIP_DEFLATED
            out.external_attr = 0o600 << 16
            dst.writestr(out, data)
    path = Path(path)
    path.write_bytes(fixed.getvalue())
    return path


def read_xlsx(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of the first sheet of ``path`` as dicts keyed by the header row (header cells stripped).

    Args:
        path: the .xlsx file.
        required: column names that must be in the header.

    Returns:
        One dict per non-empty row, ``{column: value}`` (values as openpyxl gives them, None for empty cells);
        each dict also holds ``"_row"``: the 1-based sheet row number, for error messages.

    Raises:
        DataError: naming the file, when it cannot be read or a required column is missing (listing the columns
            found).
    """
    from openpyxl import load_workbook

    path = Path(path)
    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several types for a corrupt or non-xlsx file
        raise DataError(f"{path}: cannot read spreadsheet ({e})") from e
    try:
        ws = wb.worksheets[0]
        rows = ws.iter_rows(values_only=True)
        header = next(rows, None) or ()
        columns = [str(c).strip() if c is not None else "" for c in header]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{path}: spreadsheet lacks column(s) {missing}; columns found: {[c for c in columns if c]}."
            )
        out = []
        for n, row in enumerate(rows, start=2):
            if row is None or all(v is None or (isinstance(v, str) and not v.strip()) for v in row):
                continue
            record = {c: (row[i] if i < len(row) else None) for i, c in enumerate(columns) if c}
            record["_row"] = n
            out.append(record)
        return out
    finally:
        wb.close()
