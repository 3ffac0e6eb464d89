"""``gfc demo`` in miniature: pretrain, cache, fine-tune exact vs filtered, measure, report."""

from __future__ import annotations

import json

import pytest

from gfcompiler import demo

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")


def test_demo_end_to_end_with_cache(tmp_path, capsys):
    options = demo.DemoOptions(pretrain_epochs=1, finetune_epochs=1, memory_batch=8, cache_dir=tmp_path / "cache",
                               work_dir=tmp_path / "work", threads=2)
    result = demo.run_demo(options)
    err = capsys.readouterr().err
    assert "[1/4] pretraining all layers on MNIST" in err and "[4/4] measuring peak" in err
    assert result.pretrained.exists() and result.pretrained.parent == tmp_path / "cache" / "demo"
    assert result.pretrain_accuracy > 0.5  # one epoch on 4,000 MNIST digits
    exact, filtered = result.variants
    assert (exact.patch, filtered.patch) == (0, 2)
    assert exact.accuracy_before == pytest.approx(filtered.accuracy_before)  # same pretrained weights
    assert exact.accuracy_after > exact.accuracy_before and filtered.accuracy_after > 0.3
    assert filtered.backward_macs < exact.backward_macs and filtered.held_bytes < exact.held_bytes
    for variant in (exact, filtered):
        memory = variant.peak_memory
        assert memory["batch"] == 8 and memory["training_kib"] > 0 and memory["peak_kib"] > memory["baseline_kib"]
    table = demo.render_table(result)
    assert "exact backward" in table and "gradient filter r=2" in table and "digits accuracy after" in table

    # Second run: the pretrained model comes from the cache; --json prints the numbers.
    code = demo.main(["--pretrain-epochs", "1", "--epochs", "1", "--no-memory", "--cache-dir", str(tmp_path / "cache"),
                      "--json"])
    captured = capsys.readouterr()
    assert code == 0 and "pretrained model from the cache" in captured.err
    assert "pretraining" not in captured.err
    numbers = json.loads(captured.out.strip().splitlines()[-1])
    assert numbers["pretrain_accuracy"] == pytest.approx(result.pretrain_accuracy)
    assert [v["name"] for v in numbers["variants"]] == ["exact", "filtered"]


def test_demo_rejects_patch_zero(capsys):
    assert demo.main(["--patch", "0", "--no-memory"]) == 2
    assert "patch must be at least 1" in capsys.readouterr().err
