"""Classify handwritten digits, reading each image row by row, with lstmfast.torch.

scikit-learn's bundled 8x8 digits (1797 images, no download): each image is a
sequence of 8 rows of 8 pixels. An LSTM reads the rows and a linear head
classifies its last hidden state. The LSTM is `lstmfast.torch.LSTM`, a drop-in
subclass of `torch.nn.LSTM`.

    python examples/digits_rows.py            # full run, target >= 95% test accuracy
    python examples/digits_rows.py --quick    # a short run (used by the tests)

After training it reports the test accuracy with the LSTM in int8 and under
bfloat16 autocast, beside float32's.
"""

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lstmfast.torch as lt


class RowReader(torch.nn.Module):
    def __init__(self, hidden=64, classes=10):
        super().__init__()
        self.lstm = lt.LSTM(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, images):            # (N, 8, 8): N sequences of 8 rows
        _, (h_n, _) = self.lstm(images)
        return self.head(h_n[-1])


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--plot", default="digits_rows.png", help="where to save the curves")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 40)

    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    x_train, x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)

    model = RowReader()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = {"loss": [], "train_acc": [], "test_acc": []}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(order), 32):
            batch = order[i:i + 32]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        history["loss"].append(total / len(x_train))
        history["train_acc"].append(accuracy(model, x_train, y_train))
        history["test_acc"].append(accuracy(model, x_test, y_test))
        print(f"epoch {epoch:3d}  loss {history['loss'][-1]:.4f}  train {history['train_acc'][-1]:.3f}  "
              f"test {history['test_acc'][-1]:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)

    print(f"test accuracy {history['test_acc'][-1]:.3f} (target >= 0.95)")
    report_reduced_precision(model, x_test, y_test, history["test_acc"][-1])
    save_plot(history, args.plot)
    return history["test_acc"][-1]


def report_reduced_precision(model, x_test, y_test, float_accuracy):
    """The trained model's test accuracy with its LSTM in int8 (lstmfast.torch's
    quantize_dynamic: torch's int8 weights on lstmfast's kernels) and under bfloat16
    autocast, against float32 (README "Reduced precision": within 0.5 points)."""
    int8_model = lt.quantize_dynamic(model, {torch.nn.LSTM})
    int8_accuracy = accuracy(int8_model, x_test, y_test)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    model.train()
    for name, value in (("int8", int8_accuracy), ("bfloat16", bf16_accuracy)):
        print(f"{name} test accuracy {value:.4f} (float32 {float_accuracy:.4f}, "
              f"difference {100 * (value - float_accuracy):+.2f} points)")


def save_plot(history, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(history["loss"]) + 1)
    a.plot(epochs, history["loss"])
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    b.plot(epochs, history["train_acc"], label="train")
    b.plot(epochs, history["test_acc"], label="test")
    b.axhline(0.95, color="gray", linestyle="--", label="target")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle("8x8 digits read row by row with lstmfast.torch.LSTM")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
