from contextlib import contextmanager

from hf_models import save_hf_model

from lucidlm.checkpoint import loader
from lucidlm.checkpoint.safetensors_io import SafetensorsReader


def test_loading_reports_every_byte_to_the_progress_bar(tmp_path, monkeypatch):
    save_hf_model("mixtral", tmp_path)
    seen = {}

    @contextmanager
    def recorder(total, description, enabled=None, unit_bytes=False):
        seen.update(total=total, enabled=enabled, advanced=0)

        def advance(n):
            seen["advanced"] += n

        yield advance

    monkeypatch.setattr(loader, "progress_bar", recorder)
    loader.load_model(tmp_path, progress=True)
    reader = SafetensorsReader(tmp_path)
    data_bytes = sum(t.numel() * t.element_size() for t in map(reader.get, reader.tensors))
    assert seen["enabled"] is True
    assert seen["total"] == seen["advanced"] == data_bytes


def test_small_checkpoints_load_without_a_bar(tmp_path, monkeypatch):
    save_hf_model("llama", tmp_path)
    calls = []

    @contextmanager
    def recorder(total, description, enabled=None, unit_bytes=False):
        calls.append(enabled)
        yield lambda n: None

    monkeypatch.setattr(loader, "progress_bar", recorder)
    loader.load_model(tmp_path)
    assert calls == [False]
