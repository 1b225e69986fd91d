"""A data-parallel worker for test_distributed.py: trains a BatchNorm-free net on fixed data.

Run as ``python tests/dist_worker.py RULE OUT`` under torch.distributed's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or with WORLD_SIZE unset for the single-process
reference on the combined batch.
"""

import os
import sys

import torch
from torch import nn

import lls
from lls import distributed
from lls.data import Split, TensorLoader
from lls.fit import Loaders

rule, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
blocks = [
    nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
    nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
    nn.Sequential(nn.Linear(8 * 4 * 4, 16), nn.Tanh()),
]
between = [nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), None]
net = lls.LocalNet(blocks, nn.Linear(16, 5), between, latent_pool=[2, 2, None])
trainer = lls.Trainer(net, rule, input_shape=(1, 16, 16))
g = torch.Generator().manual_seed(1)
split = Split(torch.randint(0, 256, (100, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(100) % 5)
loader = TensorLoader(split, 32, mean=(0.5,), std=(0.25,), shuffle=True, seed=3)  # last batch: 4 images
loaders = Loaders(loader, loader)
if "WORLD_SIZE" in os.environ:
    ctx = distributed.init(torch.device("cpu"), 60)
    distributed.DataParallel(ctx, trainer, loaders)
for epoch in range(2):
    for x, y in loader.epoch(epoch):
        trainer.train_step(x, y)
if os.environ.get("RANK", "0") == "0":
    torch.save(trainer.net.state_dict(), out)
if "WORLD_SIZE" in os.environ:
    # gloo's threads abort the process ("terminate called without an active exception") if the
    # interpreter exits with the group still up; leave it together and cleanly, as `lls train` does
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
