"""A checkpoint in PMC-CLIP's released layout (names and shapes of its ``PMC_CLIP`` module, written
here) loads with every fusion and MLM weight in place, and our fusion computes PMC-CLIP's."""

import torch
import torch.nn.functional as F

from unimlip_fast.loading import load_init_from
from unimlip_fast.model import build_model

from .helpers import pmc_clip_checkpoint


def pmc_clip_fusion(state: dict, layers: int, heads: int, text_states, image_features) -> torch.Tensor:
    """PMC-CLIP's ``encode_text`` fusion and MLM logits, written out from its released code."""
    b, length, width = text_states.shape
    x = torch.cat(
        [
            text_states,
            state["module.img_special_token"].expand(b, -1, -1),
            F.normalize(image_features, dim=-1)[:, None],
        ],
        dim=1,
    )
    for i in range(layers):
        p = {k.split(f"resblocks.{i}.", 1)[1]: v for k, v in state.items() if f"resblocks.{i}." in k}
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": p["attn.in_proj_weight"],
                "in_proj_bias": p["attn.in_proj_bias"],
                "out_proj.weight": p["attn.out_proj.weight"],
                "out_proj.bias": p["attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"])
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"]
        )
    return x[:, :length] @ state["module.mlm_projection"]


def test_pmc_clip_checkpoint_fills_every_fusion_weight_and_computes_its_fusion(tiny_cfg, tiny_tokenizer, tmp_path):
    cfg = tiny_cfg.model
    assert cfg.embed_dim == cfg.text.hidden_size  # as in PMC-CLIP (768 and 768): the image goes straight in
    torch.manual_seed(0)
    model = build_model(cfg, tiny_cfg.loss, tiny_tokenizer)
    vocab, width = len(tiny_tokenizer), cfg.text.hidden_size
    state = pmc_clip_checkpoint(model, vocab, width, cfg.embed_dim, cfg.fusion_layers)
    path = tmp_path / "pmc_clip.pt"
    torch.save({"state_dict": state, "epoch": 100}, path)

    torch.manual_seed(1)
    target = build_model(cfg, tiny_cfg.loss, tiny_tokenizer)
    report = load_init_from(target, str(path))
    assert not [k for k in report.missing if k.startswith(("fusion.", "visual.", "text."))], report.missing
    assert all(k.startswith("simclr_head.") for k in report.missing)  # Uni-Mlip's own, not PMC-CLIP's
    assert set(report.unexpected) == {
        "module.positional_embedding",
        "module.ln_final.weight",
        "module.ln_final.bias",
        "module.text_encoder.pooler.dense.weight",
    }
    assert report.mismatched == []
    torch.testing.assert_close(target.fusion.head.weight, state["module.mlm_projection"].T)
    torch.testing.assert_close(target.text_projection.weight, state["module.text_projection"].T)
    assert target.logit_scale.shape == (1,) and target.logit_scale.item() == state["module.logit_scale"].item()

    g = torch.Generator().manual_seed(2)
    b, length = 3, 7
    text_states, image = torch.randn(b, length, width, generator=g), torch.randn(b, cfg.embed_dim, generator=g)
    masked = torch.zeros(b, length, dtype=torch.bool)
    masked[:, 2], masked[1, 5] = True, True
    rows = masked.flatten().nonzero().squeeze(1)  # the fusion takes flat positions b * L + l, in this order
    ours = target.fusion(text_states, torch.ones(b, length, dtype=torch.long), image, rows)
    with torch.no_grad():
        theirs = pmc_clip_fusion(state, cfg.fusion_layers, cfg.fusion_heads, text_states, image)[masked]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_mlp_fusion_head_still_builds_for_older_runs(tiny_cfg, tiny_tokenizer):
    from dataclasses import replace

    model = build_model(replace(tiny_cfg.model, fusion_head="mlp"), tiny_cfg.loss, tiny_tokenizer)
    assert {"fusion.image_proj.weight", "fusion.ln_final.weight", "fusion.head.3.weight"} <= set(model.state_dict())


def test_init_from_a_run_of_this_project(tiny_cfg, tiny_tokenizer, tmp_path):
    """configs/pmc_clip.yaml's run (our naming, safetensors) is a starting point too."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer)
    (tmp_path / "run").mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "run/model.safetensors"))
    torch.manual_seed(1)
    target = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer)
    report = load_init_from(target, str(tmp_path / "run"))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    for name, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, msg=name)
