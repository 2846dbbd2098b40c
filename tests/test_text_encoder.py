"""TextEncoder: tokenisation into words, sub-word merging (checked against the raw HF model), attention, padding,
truncation warning, bad inputs and bad folders; one module-scoped test on the packaged all-MiniLM-L6-v2."""

import json
import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from amvlm_monai.networks.momentum import momentum_copy  # noqa: E402
from amvlm_monai.networks.text import TextEncoder, default_text_model_path  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lungs", "are", "clear", "no", "op", "##ac", "##ity",
         "effusion", "heart", "size", "normal", ",", "."]
TEXT = "The lungs are clear, no opacity."
# [CLS] the lungs are clear , no op ##ac ##ity . [SEP]
TEXT_WORDS = [-1, 0, 1, 2, 3, 4, 5, 6, 6, 6, 7, -1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny random BERT folders: one with a saved fast tokenizer, one with only config + vocab.txt + weights."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    bare = root / "vocab_only"
    bare.mkdir()
    (bare / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(bare)
    full = root / "with_tokenizer"
    shutil.copytree(bare, full)
    BertTokenizerFast.from_pretrained(str(bare)).save_pretrained(full)  # writes tokenizer.json
    assert sorted(os.listdir(bare)) == ["config.json", "model.safetensors", "vocab.txt"]
    assert "tokenizer.json" in os.listdir(full)
    return {"bare": bare, "full": full, "root": root}


@pytest.fixture(scope="module")
def enc(folders):
    return TextEncoder(folders["full"], max_length=16).eval()


def test_tokenize_word_index(enc):
    batch = enc.tokenize([TEXT, "heart size normal"])
    assert set(batch) == {"input_ids", "attention_mask", "word_index"}
    assert all(v.shape == (2, 16) and v.dtype == torch.long for v in batch.values())
    wi = batch["word_index"]
    assert wi[0].tolist() == TEXT_WORDS + [-1] * 4
    assert wi[1].tolist() == [-1, 0, 1, 2, -1] + [-1] * 11
    assert batch["attention_mask"][0].tolist() == [1] * 12 + [0] * 4
    assert enc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, 7:10].tolist()) == ["op", "##ac", "##ity"]


def test_subword_merge_and_attention_against_raw_model(enc):
    batch = enc.tokenize([TEXT, "heart size normal"])
    out = enc(**batch)
    assert enc.hidden_size == 16
    assert out.cls.shape == (2, 16) and out.tokens.shape == (2, 16, 16) and out.attn.shape == (2, 16)
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == [8, 3]
    raw = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    h = raw.last_hidden_state
    torch.testing.assert_close(out.cls, h[:, 0])
    torch.testing.assert_close(out.tokens[0, 6], h[0, 7] + h[0, 8] + h[0, 9])  # "opacity" = op + ##ac + ##ity
    torch.testing.assert_close(out.tokens[0, :6], h[0, 1:7])
    torch.testing.assert_close(out.tokens[0, 7], h[0, 10])
    assert bool((out.tokens[0, 8:] == 0).all()) and bool((out.tokens[1, 3:] == 0).all())
    a = raw.attentions[-1][:, :, 0].mean(1)  # (B, L) CLS row, heads averaged
    ref0 = torch.cat([a[0, 1:7], a[0, 7:10].sum(0, keepdim=True), a[0, 10:11]])
    torch.testing.assert_close(out.attn[0, :8], ref0 / ref0.sum())
    torch.testing.assert_close(out.attn.sum(1), torch.ones(2))
    assert bool((out.attn[~out.mask] == 0).all())


def test_padding_and_batch_never_change_results(folders, enc):
    alone = enc(**enc.tokenize([TEXT]))
    pair = enc(**enc.tokenize(["heart size normal", TEXT]))
    longer = TextEncoder(folders["full"], max_length=40).eval()  # 24 more padding slots
    padded = longer(**longer.tokenize([TEXT]))
    for other, i in ((pair, 1), (padded, 0)):
        torch.testing.assert_close(other.cls[i], alone.cls[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.tokens[i, :8], alone.tokens[0, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.attn[i, :8], alone.attn[0, :8], atol=1e-6, rtol=1e-5)
        assert other.mask[i].sum() == 8


def test_vocab_only_folder_gives_the_same_as_saved_tokenizer(folders, enc):
    bare = TextEncoder(folders["bare"], max_length=16).eval()
    assert bare.tokenizer.is_fast
    b1, b2 = enc.tokenize([TEXT]), bare.tokenize([TEXT])
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    torch.testing.assert_close(bare(**b2).tokens, enc(**b1).tokens)


def test_truncation_warns_once_per_instance(folders):
    short = TextEncoder(folders["full"], max_length=6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        b = short.tokenize([TEXT, "no effusion"])
        short.tokenize([TEXT])
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1
    assert "texts[0]" in str(rec[0].message)
    # [CLS] the lungs are clear [SEP]
    assert b["input_ids"][0, -1].item() == short.tokenizer.sep_token_id
    assert b["word_index"][0].tolist() == [-1, 0, 1, 2, 3, -1]
    assert short(**b).mask.sum(1).tolist() == [4, 2]
    other = TextEncoder(folders["full"], max_length=6)
    with pytest.warns(UserWarning, match="truncated"):
        other.tokenize([TEXT])


def test_bad_texts(enc):
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        enc.tokenize(["no effusion", ""])
    with pytest.raises(ValueError, match=r"texts\[2\] is empty or whitespace"):
        enc.tokenize(["a", "b", " \n\t "])
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        enc.tokenize(["no effusion", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        enc.tokenize([3])
    with pytest.raises(TypeError, match="single string"):
        enc.tokenize(TEXT)
    with pytest.raises(ValueError, match="texts is empty"):
        enc.tokenize([])
    with pytest.raises(ValueError, match=r"texts\[0\] gives no tokens"):
        enc.tokenize(["\x00\x01"])
    b = enc.tokenize([TEXT])
    with pytest.raises(ValueError, match="word_index must have the shape"):
        enc(b["input_ids"], b["attention_mask"], b["word_index"][:, :5])


def test_bad_folders_and_options(folders):
    root = folders["root"]
    with pytest.raises(ValueError, match="does not exist"):
        TextEncoder(root / "missing")
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=r"empty.*no config\.json"):
        TextEncoder(empty)
    gpt = root / "gpt"
    gpt.mkdir(exist_ok=True)
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"gpt.*model_type='gpt2', not a BERT-family"):
        TextEncoder(gpt)
    no_tok = root / "no_tokenizer"
    no_tok.mkdir(exist_ok=True)
    shutil.copy(folders["bare"] / "config.json", no_tok)
    shutil.copy(folders["bare"] / "model.safetensors", no_tok)
    with pytest.raises(ValueError, match=r"no_tokenizer.*no tokenizer files"):
        TextEncoder(no_tok)
    big_vocab = root / "big_vocab"
    shutil.copytree(folders["bare"], big_vocab, dirs_exist_ok=True)
    (big_vocab / "vocab.txt").write_text("\n".join(VOCAB + [f"w{i}" for i in range(10)]) + "\n")
    with pytest.raises(ValueError, match=r"big_vocab.*29 tokens but the model's embedding only 19"):
        TextEncoder(big_vocab)
    no_w = root / "no_weights"
    no_w.mkdir(exist_ok=True)
    shutil.copy(folders["bare"] / "config.json", no_w)
    shutil.copy(folders["bare"] / "vocab.txt", no_w)
    with pytest.raises(ValueError, match=r"no_weights.*cannot load the model"):
        TextEncoder(no_w)
    with pytest.raises(ValueError, match="num_layers"):
        TextEncoder(folders["full"], num_layers=3)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(folders["full"], max_length=100)


def test_num_layers_truncates_encoder(folders, enc):
    one = TextEncoder(folders["full"], max_length=16, num_layers=1).eval()
    assert len(one.model.encoder.layer) == 1 and one.num_layers == 1 and one.model.config.num_hidden_layers == 1
    assert one.model.pooler is None
    b = one.tokenize([TEXT])
    hs = enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(one(**b).cls, hs.hidden_states[1][:, 0])  # = output of the full model's layer 1


def test_gradients_reach_every_parameter(folders):
    m = TextEncoder(folders["full"], max_length=16).train()
    out = m(**m.tokenize([TEXT, "heart size normal"]))
    ((out.cls * torch.randn_like(out.cls)).sum() + (out.tokens * torch.randn_like(out.tokens)).sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_momentum_copy_of_text_encoder(enc):
    c = momentum_copy(enc)
    b = c.tokenize([TEXT])
    assert c.hidden_size == 16 and not c.training
    torch.testing.assert_close(c(**b).tokens, enc(**b).tokens)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(max_length=20).eval()


def test_packaged_minilm(minilm):
    assert os.path.isfile(os.path.join(default_text_model_path(), "config.json"))
    assert minilm.hidden_size == 384 and minilm.num_layers == 6
    b = minilm.tokenize(["Lungs are hyperinflated, bilateral opacities.", "No effusion"])
    pieces = minilm.tokenizer.convert_ids_to_tokens(b["input_ids"][0, 3:7].tolist())
    assert pieces == ["hyper", "##in", "##fl", "##ated"]
    assert b["word_index"][0, :14].tolist() == [-1, 0, 1, 2, 2, 2, 2, 3, 4, 5, 5, 5, 6, -1]
    with torch.no_grad():
        out = minilm(**b)
        h = minilm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    assert out.tokens.shape == (2, 20, 384) and out.mask.sum(1).tolist() == [7, 2]
    torch.testing.assert_close(out.tokens[0, 2], h[0, 3:7].sum(0))
    torch.testing.assert_close(out.attn.sum(1), torch.ones(2))
