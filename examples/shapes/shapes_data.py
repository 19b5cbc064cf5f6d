"""A user's own dataset for dsdtune: small procedurally drawn images, served as torch Datasets (streamed).

Each item is a 3x16x16 image of one of four shapes (horizontal bar, vertical bar, square, cross) at
a random place, in a random colour, on noise. Items are drawn from their own index, so the data are
the same everywhere without any file; the training set adds a random horizontal flip, drawn from
torch's global generator as user transforms usually are (dsdtune seeds it per batch, so runs repeat).
"""
import torch
from torch.utils.data import Dataset

CLASSES = ("horizontal bar", "vertical bar", "square", "cross")


class Shapes(Dataset):
    def __init__(self, size: int, seed: int, image_size: int = 16, flip: bool = False):
        self.size, self.seed, self.image_size, self.flip = size, seed, image_size, flip

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(0, len(CLASSES), (1,), generator=g))
        s = self.image_size
        image = 0.3 * torch.randn(3, s, s, generator=g)
        colour = 0.5 + torch.rand(3, 1, 1, generator=g)
        r, c = (int(v) for v in torch.randint(3, s - 3, (2,), generator=g))
        mask = torch.zeros(s, s)
        if label in (0, 3):
            mask[r, max(0, c - 3):c + 4] = 1
        if label in (1, 3):
            mask[max(0, r - 3):r + 4, c] = 1
        if label == 2:
            mask[r - 2:r + 3, c - 2:c + 3] = 1
            mask[r - 1:r + 2, c - 1:c + 2] = 0
        image = image + colour * mask
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label


def load(data_dir: str, num_train: int = 1200, num_test: int = 400, image_size: int = 16) -> dict:
    """dsdtune calls this as load(data_dir=..., **task.dataset_args); nothing is read from data_dir."""
    return {"train": Shapes(num_train, seed=1, image_size=image_size, flip=True),
            "test": Shapes(num_test, seed=2, image_size=image_size),
            "num_classes": len(CLASSES)}
