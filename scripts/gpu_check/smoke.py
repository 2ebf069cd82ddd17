"""TorchRec + FBGEMM on CUDA, alone: a sharded EBC's forward and backward."""

import os

import fbgemm_gpu
import torch
import torch.distributed as dist
import torchrec
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "fbgemm_gpu": fbgemm_gpu.__version__}
print(versions, "torchrec", getattr(torchrec, "__version__", "?"), flush=True)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=100, feature_names=["f"])], device=torch.device("meta"))
dmp = DistributedModelParallel(ebc, device=torch.device("cuda"))
kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 2])).to("cuda")
out = dmp(kjt)
out.values().sum().backward()
torch.cuda.synchronize()
print("smoke ok", tuple(out.values().shape), dmp.plan, flush=True)
dist.destroy_process_group()
