"""How big noise=noisefit's noise is per token against NEFTune's, on the overfit study's model and data: the mean
over real tokens of |noise| / |embedding| for noise=uniform at alpha 20, and of |noise| / |h| on each layer's output
for noise=noisefit at scale 1 (the noise is linear in the scale). The scale with NEFTune alpha 20's per-token size is
the top of noisefit's search range (docs/methods.md):

    PYTHONPATH=. python benchmarks/noisefit_scale.py
"""
import torch
from tests.helpers import compose_cfg
from neftlab import models
from neftlab.data.prepare import prepare
from neftlab.methods import noise
cfg = compose_cfg("experiment=overfit")
files = models.locate(cfg.model)
tok = models.load_tokenizer(cfg.model, files)
data = prepare(cfg.data, tok, True, 1)
model = models.load_model(cfg.model, tok, seed=1, files=files)
rows = [data.train[i]["input_ids"] for i in range(8)]
L = max(map(len, rows))
ids = torch.full((len(rows), L), tok.pad_token_id); mask = torch.zeros_like(ids)
for i, r in enumerate(rows):
    ids[i, :len(r)] = torch.tensor(r); mask[i, :len(r)] = 1
print("lengths", [len(r) for r in rows], "d", model.config.hidden_size)
real = mask.bool()
emb = model.get_input_embeddings()
seen = []
model.train()
with noise.attach(model, "uniform", alpha=20.0, seed=1):
    h = emb.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
clean = emb(ids).detach()
rel = ((seen[0] - clean).norm(dim=-1) / clean.norm(dim=-1))[real]
print("NEFTune alpha 20: per-token |noise|/|embedding| mean %.4f median %.4f" % (rel.mean(), rel.median()))
kind = noise.attach(model, "noisefit", seed=1, scale=1.0)
out = {}
def grab(i):
    def f(m, a, o):
        hs = o[0] if isinstance(o, tuple) else o
        n = kind.draw(hs)
        out[i] = ((n.norm(dim=-1) / hs.float().norm(dim=-1))[real]).mean().item()
    return f
hs = [l.register_forward_hook(grab(i)) for i, l in enumerate(kind.stack)]
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
for x in hs: x.remove()
print("NoiseFiT scale 1: per-token |noise|/|h| by layer", {k: round(v, 4) for k, v in out.items()})
vals = sorted(out.values())
print("median over layers %.4f -> scale for NEFTune alpha 20: %.2f" % (vals[len(vals)//2], rel.mean().item() / vals[len(vals)//2]))
