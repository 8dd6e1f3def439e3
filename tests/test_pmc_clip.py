import torch

from unimlip_fast.model import build_model
from unimlip_fast.model.pmc_clip import _FUSION_BLOCK, load_pmc_clip


def pmc_clip_state_from(model):
    """A checkpoint in PMC-CLIP's naming, made from our own weights (+ keys PMC-CLIP has and we don't)."""
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    inverse_block = {v: k for k, v in _FUSION_BLOCK.items()}
    theirs = {}
    for name, value in ours.items():
        if name.startswith("visual."):
            theirs["module." + name] = value
        elif name.startswith("text.encoder."):
            theirs["module.text_encoder." + name.removeprefix("text.encoder.")] = value
        elif name.startswith("fusion.blocks.layers."):
            index, rest = name.removeprefix("fusion.blocks.layers.").split(".", 1)
            theirs[f"module.fusion_module.resblocks.{index}.{inverse_block[rest]}"] = value
    theirs["module.text_projection"] = ours["text_projection.weight"].T.contiguous()
    theirs["module.logit_scale"] = torch.tensor(4.2)  # 0-dim, as PMC-CLIP stores it
    theirs["module.img_special_token"] = ours["fusion.image_token"].reshape(1, 1, -1)
    theirs["module.mlm_projection"] = ours["fusion.head.3.weight"].T.contiguous()
    theirs["module.positional_embedding"] = torch.zeros(77, 8)  # unused by PMC-CLIP's BERT path
    theirs["module.text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    return theirs


def test_pmc_clip_checkpoint_maps_onto_our_names(tiny_cfg, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer)
    path = tmp_path / "pmc_clip.pt"
    torch.save({"state_dict": pmc_clip_state_from(source), "epoch": 100}, path)

    torch.manual_seed(1)
    target = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer)
    report = load_pmc_clip(target, str(path))
    for name in ("visual.layer1.0.conv1.weight", "text_projection.weight", "fusion.blocks.layers.0.linear1.weight",
                 "text.encoder.embeddings.word_embeddings.weight", "fusion.head.3.weight"):
        torch.testing.assert_close(target.state_dict()[name], source.state_dict()[name])
    assert target.logit_scale.item() == torch.tensor(4.2).item()
    assert set(report.unexpected) == {"module.positional_embedding", "module.text_encoder.pooler.dense.weight"}
    # Ours but not PMC-CLIP's: the fusion's image projection, the MLM transform, the SimCLR head.
    assert "fusion.image_proj.weight" in report.missing and "simclr_head.net.0.weight" in report.missing
    assert not any(name.startswith("visual.") for name in report.missing)
    assert report.mismatched == []
