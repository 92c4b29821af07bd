"""Run under torchrun (2 gloo ranks): Engine.score / greedy generate on an FSDP2-sharded model
equal the unsharded model. Used by tests/test_distributed.py."""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from lingua.transformer import TransformerArgs, build_model
from lingua.generation import Engine
from lingua.sampling import SamplingParams
dist.init_process_group("gloo")
torch.set_num_threads(1)
class Tok:
    bos_id, eos_id, pad_id, vocab_size = 1, 2, None, 256
    def encode(self, t, add_bos=False, add_eos=False): raise NotImplementedError
    def decode(self, ids): return ""
args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seqlen=64)
ref = build_model(args).eval()
sharded = build_model(args).eval()
mesh = init_device_mesh("cpu", (2,))
for b in sharded.layers: fully_shard(b, mesh=mesh)
fully_shard(sharded, mesh=mesh)
g = torch.Generator().manual_seed(0)
ctxs = [[1] + torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 17)]
pairs = [(c, torch.randint(3, 256, (7,), generator=g).tolist()) for c in ctxs] + [(ctxs[0], [5, 6, 7]), (ctxs[0], [8, 9])]
a = Engine(ref, Tok()).score(pairs)
b = Engine(sharded, Tok()).score(pairs)
diff = max(abs(x.sum_logprob - y.sum_logprob) for x, y in zip(a, b))
p = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
ga = Engine(ref, Tok()).generate(ctxs, p); gb = Engine(sharded, Tok()).generate(ctxs, p)
same = all(x[0].token_ids == y[0].token_ids for x, y in zip(ga, gb))
print(f"rank {dist.get_rank()}: score max diff {diff:.2e}, greedy same {same}")
assert diff < 1e-4 and same
dist.destroy_process_group()
