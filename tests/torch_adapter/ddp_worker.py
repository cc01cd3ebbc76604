"""One process of the data-parallel test (tests/torch_adapter/test_distributed.py runs two).

    python ddp_worker.py RANK WORLD_SIZE PORT OUT_FILE

Trains a small lstmfast.torch model under DistributedDataParallel (gloo, on
127.0.0.1) on this rank's half of a fixed batch, then saves its parameters.
With WORLD_SIZE 1 it trains on the whole batch in a plain process: the result
every replica must match.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import lstmfast.torch as lt

STEPS = 5
BATCH = 8


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = lt.LSTM(3, 6, num_layers=2, batch_first=True)
        self.cell = lt.GRUCell(6, 4)  # stepped in a loop: its steps' gradients are summed per pass
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        h = None
        for t in range(out.shape[1]):
            h = self.cell(out[:, t], h)
        return self.head(h)


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
    return x, y


def main(rank, world, port, out_file):
    torch.manual_seed(0)  # the same initial weights in every process
    torch.set_num_threads(1)
    model = Model().double()
    x, y = data()
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        model = torch.nn.parallel.DistributedDataParallel(model)
        share = BATCH // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP averages the gradients over the ranks here
        opt.step()
    module = model.module if world > 1 else model
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out_file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
