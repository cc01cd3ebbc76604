"""Predict cos(t) from sin(t) with lstmfast's NumPy API only.

An LSTM reads a window of sin(t + phase) and a linear head maps each hidden
state to cos(t + phase). The training loop is all here: the forward call, the
loss, `layer.backward`, the head's gradient and an Adam optimizer written out in
NumPy. No framework is involved.

    python examples/sine_to_cosine.py            # full run, target MSE < 1e-3
    python examples/sine_to_cosine.py --quick    # a short run (used by the tests)
"""

import argparse
import time

import numpy as np

import lstmfast


class Adam:
    """Adam (Kingma & Ba) over a dict of NumPy arrays, updated in place."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def make_batch(rng, batch, steps, dt=0.1):
    phase = rng.uniform(0, 2 * np.pi, size=(1, batch, 1))
    t = phase + dt * np.arange(steps).reshape(steps, 1, 1)
    return np.sin(t).astype(np.float32), np.cos(t).astype(np.float32)  # (T, N, 1) each


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--backend", default="fused", choices=["fused", "numpy"])
    parser.add_argument("--plot", default="sine_to_cosine.png", help="where to save the loss curve")
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 1500)

    rng = np.random.default_rng(0)
    hidden = 32
    lstm = lstmfast.LSTM(1, hidden, seed=0, backend=args.backend)
    head = {"W": (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32),
            "b": np.zeros(1, np.float32)}
    # One optimizer over the layer's live parameter arrays and the head's.
    params = {**{k: getattr(lstm, k) for k in lstm.state_dict()}, **head}
    opt = Adam(params, lr=1e-2)

    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if step == int(steps * 0.7):
            opt.lr = 3e-3  # a smaller step to settle
        x, y = make_batch(rng, batch=32, steps=50)
        out, _ = lstm(x)                                 # (T, N, H)
        pred = out @ head["W"] + head["b"]               # (T, N, 1)
        err = pred - y
        # The first steps see too little of the wave to know the phase: skip them.
        warmup = 5
        loss = float(np.mean(err[warmup:] ** 2))
        d_pred = np.zeros_like(err)
        d_pred[warmup:] = 2 * err[warmup:] / err[warmup:].size
        grads = {"W": out.reshape(-1, hidden).T @ d_pred.reshape(-1, 1), "b": d_pred.sum(axis=(0, 1))}
        lstm.zero_grad()
        lstm.backward(d_pred @ head["W"].T)
        grads.update(lstm.grad)
        opt.step(grads)
        history.append(loss)
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:5d}  mse {loss:.2e}  ({time.perf_counter() - start:.1f} s)", flush=True)

    lstm.eval()
    x, y = make_batch(np.random.default_rng(1), batch=256, steps=50)
    out, _ = lstm(x)
    test_mse = float(np.mean(((out @ head["W"] + head["b"]) - y)[5:] ** 2))
    print(f"test mse {test_mse:.2e} (target < 1e-3)")
    save_plot(history, test_mse, args.plot)
    return test_mse


def save_plot(history, test_mse, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(history, label="training mse")
    ax.axhline(1e-3, color="gray", linestyle="--", label="target 1e-3")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mse")
    ax.set_title(f"sin -> cos with lstmfast's NumPy API (test mse {test_mse:.1e})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
