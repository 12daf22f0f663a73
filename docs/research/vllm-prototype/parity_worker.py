"""Runs inside the vLLM worker (LLM.apply_model)."""


def worker_fn(model):
    import torch
    from ficoco_vllm_proto.ficoco_bridge import VllmVisionBridge
    ref = torch.load(__import__("os").environ.get("REF", "/tmp/vllm-proto/hf_ref.pt"))
    pv = ref["pixel_values"].to(next(model.parameters()).dtype)
    layers = model.vision_tower.vision_model.encoder.layers
    res = {}
    with torch.no_grad():
        for name in ["vanilla", "ficoco-v", "tome", "evit", "tome-noprop"]:
            opts = {"method": "ficoco:" + name.replace("-noprop", ""), "retain": 64}
            if name.endswith("-noprop"):
                opts["proportional_attention"] = False
            bridge = None if name == "vanilla" else VllmVisionBridge(model.config, opts, layers)
            f = model.multi_modal_projector(model.vision_tower(pv, feature_select_strategy="default"))[0]
            pos = None if bridge is None else bridge.side.last.positions[0].clone()
            if bridge is not None:
                bridge.remove()
            r = ref[name]
            res[name] = dict(shape=tuple(f.shape), max_abs=float((f.float() - r).abs().max()), ref_scale=float(r.abs().max()),
                             same_positions=None if pos is None else bool(torch.equal(pos.cpu(), ref[name + ":positions"])))
    return res

