import base64, json, time, urllib.request
img = base64.b64encode(open("/tmp/vllm-proto/scene.png", "rb").read()).decode()
qs = json.load(open("/tmp/vllm-proto/scene.json"))
for q, a in zip(qs["questions"], qs["answers"]):
    body = {"model": "proxy-llava", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}},
                {"type": "text", "text": q}]}]}
    t = time.time()
    req = urllib.request.Request("http://127.0.0.1:8765/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=60))
    print(f"{time.time()-t:.2f}s prompt_tokens={r['usage']['prompt_tokens']} answer={r['choices'][0]['message']['content']!r} expected={a!r}")
