"""HF reference (system python, transformers 5.24, ficoco from /work/main): pixel values and the
image features (after the projector) of vanilla and each encoder method at retain=64."""
import torch, ficoco
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
path = "/tmp/vllm-proto/proxy-llava"
model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(path)
img = Image.open(__import__("os").environ.get("IMG", "/tmp/vllm-proto/scene.png")).convert("RGB")
pv = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"].float()
out = {"pixel_values": pv}
def feats():
    f = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-2, vision_feature_select_strategy="default")
    f = getattr(f, "pooler_output", f)
    if isinstance(f, (list, tuple)):
        f = torch.stack(list(f)) if f[0].dim() == 2 else f[0]
    return f.reshape(-1, f.shape[-1])
with torch.no_grad():
    out["vanilla"] = feats()
    for name, extra in [("ficoco-v", {}), ("tome", {}), ("evit", {}), ("tome-noprop", {"proportional_attention": False})]:
        with ficoco.apply(model, name.replace("-noprop", ""), retain=64, record=True, **extra) as h:
            out[name] = feats()
            out[name + ":positions"] = h.vision_trace.positions[0] if h.vision_trace is not None else None
for k, v in out.items():
    print(k, None if v is None else tuple(v.shape))
torch.save(out, __import__("os").environ.get("REF", "/tmp/vllm-proto/hf_ref.pt"))
