"""Quick parity probe (docs/exploration.md): train repguide's ParityRNN on lengths 2..MAX_LEN with
random batches of 128, Adam and gradient clipping 1, and print the loss, the validation accuracy
and the accuracy on strings of length <= 10 every 250 steps.

    OMP_NUM_THREADS=1 python scripts/parity_probe.py MAX_LEN CELL STEPS LR HIDDEN [SEED]
    OMP_NUM_THREADS=1 python scripts/parity_probe.py 50 rnn 5000 0.003 64   # ~70 s; 100% from ~4,000
"""

import sys
import time

import torch
import torch.nn.functional as F

from repguide import data, models

max_len, cell, steps, lr, hidden = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(int(sys.argv[6]) if len(sys.argv) > 6 else 0)
splits = data.create("parity", min_len=2, max_len=max_len, train_size=38400, val_size=2000, test_size=2000)
model = models.create("parity_rnn", hidden_dim=hidden, num_layers=1, cell=cell)
optimizer = torch.optim.Adam(model.parameters(), lr=lr)
start = time.time()
for step in range(steps):
    x, lengths, y = splits.train.batch(torch.randint(len(splits.train), (128,)))
    loss = F.cross_entropy(model(x, lengths), y)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if step % 250 == 0 or step == steps - 1:
        with torch.no_grad():
            x, lengths, y = splits.val.batch(torch.arange(len(splits.val)))
            hit = (model(x, lengths).argmax(1) == y).float()
        print(f"step {step}: loss {loss.item():.4f}  val acc {hit.mean().item():.4f}  "
              f"len<=10 acc {hit[lengths <= 10].mean().item():.4f}  {time.time() - start:.0f} s", flush=True)
