"""Speed up an existing torch model with one line: `lstmfast.torch.accelerate(model)`.

The model below is plain torch: a 2-layer LSTM encoder, a GRU on top and a
linear head, the shape of a small streaming speech or sensor model. It is timed
as torch runs it, then `accelerate` swaps its RNN modules for lstmfast's in
place (same parameters, same optimizer state), and it is timed again. The
outputs and gradients are checked to agree.

Then the model serves a stream, fed ten frames per call with its states carried
from call to call: as torch runs it, and as `lstmfast.torch.freeze(model)` (a copy
whose recurrent weights are laid out for the kernels once) runs it. The streamed
outputs are checked against the whole sequence's.

    python examples/accelerate_torch_model.py
    python examples/accelerate_torch_model.py --quick    # fewer repetitions (tests)
"""

import argparse
import copy
import time

import torch

import lstmfast
import lstmfast.torch as lt


class Encoder(torch.nn.Module):
    def __init__(self, features=40, hidden=128, classes=12):
        super().__init__()
        self.lstm = torch.nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.gru = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)

    def stream(self, chunk, state=None):
        """The next frames of a stream (N, frames, features) and the states the call
        before left: the outputs of these frames, and the states for the next call."""
        lstm_state, gru_state = state if state is not None else (None, None)
        y, lstm_state = self.lstm(chunk, lstm_state)
        y, gru_state = self.gru(y, gru_state)
        return self.head(y), (lstm_state, gru_state)


def serve(model, x, frames_per_call):
    """The stream x fed ``frames_per_call`` frames per call: the outputs of all frames."""
    outputs, state = [], None
    with torch.inference_mode():
        for chunk in x.split(frames_per_call, dim=1):
            y, state = model.stream(chunk, state)
            outputs.append(y)
    return torch.cat(outputs, dim=1)


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model, x, repeats):
    def infer():
        model.eval()
        with torch.no_grad():
            return model(x)

    def train_step():
        model.train()
        model.zero_grad()
        model(x).square().mean().backward()

    return best_time(infer, repeats), best_time(train_step, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--plot", default="accelerate_torch_model.png", help="where to save the bar chart")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 10

    torch.manual_seed(0)
    threads = lstmfast.get_num_threads()
    torch.set_num_threads(threads)
    model = Encoder()
    x = torch.randn(args.batch, args.steps, 40)
    print(f"input {tuple(x.shape)} (N, T, features), float32, {threads} threads")

    before = copy.deepcopy(model)
    t_torch = measure(model, x, repeats)
    print(f"torch:    inference {t_torch[0] * 1e3:8.2f} ms   training step {t_torch[1] * 1e3:8.2f} ms")

    lt.accelerate(model)  # the one line
    t_fast = measure(model, x, repeats)
    print(f"lstmfast: inference {t_fast[0] * 1e3:8.2f} ms   training step {t_fast[1] * 1e3:8.2f} ms")
    print(f"speedup:  inference {t_torch[0] / t_fast[0]:8.2f}x    training step {t_torch[1] / t_fast[1]:8.2f}x")

    # Same function before and after: outputs and gradients agree.
    model.eval(), before.eval()
    model.zero_grad(), before.zero_grad()
    out_fast, out_torch = model(x), before(x)
    out_fast.square().mean().backward()
    out_torch.square().mean().backward()
    scale = max(1.0, out_torch.abs().max().item())
    diff = (out_fast - out_torch).abs().max().item() / scale
    grad_diff = max((a.grad - b.grad).abs().max().item() / max(1.0, b.grad.abs().max().item())
                    for a, b in zip(model.parameters(), before.parameters()))
    print(f"max relative difference: outputs {diff:.1e}, gradients {grad_diff:.1e}")
    assert diff < 1e-5 and grad_diff < 1e-5, "lstmfast and torch disagree"

    # A stream, ten frames per call, states carried: torch's model, then a frozen copy.
    frozen = lt.freeze(model)
    t_stream_torch = best_time(lambda: serve(before.eval(), x, 10), repeats)
    t_stream_frozen = best_time(lambda: serve(frozen, x, 10), repeats)
    print(f"stream, 10 frames per call: torch {t_stream_torch * 1e3:8.2f} ms   lstmfast frozen "
          f"{t_stream_frozen * 1e3:8.2f} ms   speedup {t_stream_torch / t_stream_frozen:8.2f}x")
    with torch.no_grad():
        whole = before(x)
    streamed = serve(frozen, x, 10)
    stream_diff = (streamed - whole).abs().max().item() / max(1.0, whole.abs().max().item())
    print(f"streamed against whole sequence: max relative difference {stream_diff:.1e}")
    assert stream_diff < 1e-5, "the frozen model's stream disagrees with torch's whole sequence"
    save_plot(t_torch, t_fast, args.plot)
    return t_torch, t_fast


def save_plot(t_torch, t_fast, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["inference", "training step"]
    xs = range(len(labels))
    ax.bar([i - 0.2 for i in xs], [t * 1e3 for t in t_torch], width=0.4, label="torch")
    ax.bar([i + 0.2 for i in xs], [t * 1e3 for t in t_fast], width=0.4, label="lstmfast (accelerate)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_ylabel("ms (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
