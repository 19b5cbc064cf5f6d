"""Train small_cnn on the shapes data with plain PyTorch and save its state_dict to trained.pt.

This stands for "a model you trained yourself" (or downloaded): prune_trained.yaml then starts a
dsdtune study from it (init.checkpoint) and prunes it, the DSD paper's own setting.
Run from anywhere: `python examples/shapes/train_dense.py`.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from shapes_data import load
from shapes_net import small_cnn

torch.manual_seed(0)
torch.set_num_threads(1)
data = load(data_dir="unused")
loader = torch.utils.data.DataLoader(data["train"], batch_size=64, shuffle=True)
model = small_cnn(input_shape=(3, 16, 16), num_classes=data["num_classes"], width=16)
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
for epoch in range(8):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}")
model.eval()
with torch.no_grad():
    test = torch.utils.data.DataLoader(data["test"], batch_size=400)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
print(f"test accuracy {correct / len(data['test']):.3f}")
path = Path(__file__).resolve().parent / "trained.pt"
torch.save(model.state_dict(), path)
print(f"saved {path}")
