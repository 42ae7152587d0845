"""The full-resolution width study: only decoder_channels[0] changes, and cost follows it."""
from __future__ import annotations

import json

import pytest

from nnunet_logonet.benchmark.full_res_width import count_variants, main, width_variant
from nnunet_logonet.benchmark.models import resolve_model

SIZE = [32, 32, 32]


def test_variant_changes_only_the_full_resolution_width():
    base = resolve_model("logonet_s", patch_size=(64, 64, 64))
    variant = width_variant(base, 32)
    assert variant.name == "logonet_s_w32"
    assert variant.arch_kwargs["decoder_channels"] == [32, *base.arch_kwargs["decoder_channels"][1:]]
    assert base.arch_kwargs["decoder_channels"][0] == 16  # the preset is not modified
    assert {k: v for k, v in variant.arch_kwargs.items() if k != "decoder_channels"} == \
        {k: v for k, v in base.arch_kwargs.items() if k != "decoder_channels"}
    with pytest.raises(ValueError, match=">= 1"):
        width_variant(base, 0)


def test_narrower_full_resolution_costs_fewer_macs_and_parameters():
    rows = count_variants(["logonet_tiny"], [16, 8], SIZE)
    wide, narrow = rows
    assert wide["width"] == wide["default_width"] == 16
    assert narrow["macs"] < wide["macs"] and narrow["parameters"] < wide["parameters"]
    assert wide["paper_gflops"] is None  # not the paper's patch: no paper comparison


def test_cli_writes_counts_and_rejects_unknown_models(tmp_path, capsys):
    out = tmp_path / "widths.json"
    assert main(["--models", "logonet_tiny", "--widths", "16", "8", "--count-size", *map(str, SIZE),
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["width"] for r in data["counts"]] == [16, 8]
    assert "(preset)" in capsys.readouterr().out
    assert main(["--models", "nnunet"]) == 2
    assert "valid: " in capsys.readouterr().err
