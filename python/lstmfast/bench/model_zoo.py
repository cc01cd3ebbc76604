"""The whole torch models ``python -m lstmfast.bench --models`` times: seven small models
in the shape of common recurrent architectures, plain torch as their authors would
write them, each with its sizes (full, and tiny for tests), inputs and training loss.

Part of the ``models`` mode (``lstmfast.bench.models`` times them; the tests build
them); it imports torch and nothing of the benchmark's.
"""

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn import functional as F

# float32 across two implementations whose sums run in different orders; relative
# to the largest magnitude of each compared tensor (the convention of the tests).
AGREEMENT_RTOL = 1e-4
RNN_TYPES = (nn.RNNBase, nn.RNNCellBase, nnqd.LSTM, nnqd.GRU)
# int8 against int8: torch quantizes each product's activations per tensor, lstmfast
# per row (README "Reduced precision"), so outputs agree within int8's error.
INT8_AGREEMENT_RTOL = 5e-2
MODEL_SEED, INPUT_SEED = 0, 1


# ---------------------------------------------------------------------------
# The models: plain torch, as their authors would write them.


class CRNN(nn.Module):
    """A CRNN text-line recognizer (Shi et al. 2015): conv features of a 32-pixel-high
    grey image, one column per time step, two bidirectional LSTMs, per-column classes."""

    def __init__(self, channels, hidden, classes):
        super().__init__()
        # Five halvings of the height (32 -> 1), two of the width (W -> W/4 columns).
        pools = [(2, 2), (2, 2), (2, 1), (2, 1), (2, 1)]
        blocks, c_in = [], 1
        for c_out, pool in zip(channels, pools):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(pool)]
            c_in = c_out
        self.conv = nn.Sequential(*blocks)
        self.rnn1 = nn.LSTM(c_in, hidden, bidirectional=True)
        self.between = nn.Linear(2 * hidden, hidden)
        self.rnn2 = nn.LSTM(hidden, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, image):  # (N, 1, 32, W)
        columns = self.conv(image).squeeze(2).permute(2, 0, 1)  # (W/4, N, C)
        y, _ = self.rnn1(columns)
        y, _ = self.rnn2(self.between(y))
        return self.head(y)  # (W/4, N, classes)


class GRUForecaster(nn.Module):
    """A 2-layer GRU reads a window of a multivariate series and predicts the next steps."""

    def __init__(self, features, hidden, horizon):
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, window):  # (N, T, features)
        y, _ = self.gru(window)
        return self.head(y[:, -1])  # (N, horizon)


class BiLSTMSeparator(nn.Module):
    """A music-separator core (Open-Unmix style): spectrogram frames are compressed by a
    linear layer, a 3-layer bidirectional LSTM runs over time, and a linear layer with a
    sigmoid gives a mask over the input bins."""

    def __init__(self, bins, rnn_input, hidden):
        super().__init__()
        self.encode = nn.Linear(bins, rnn_input)
        self.lstm = nn.LSTM(rnn_input, hidden, num_layers=3, bidirectional=True)
        self.decode = nn.Linear(2 * hidden, bins)

    def forward(self, frames):  # (T, N, bins)
        y, _ = self.lstm(torch.tanh(self.encode(frames)))
        return torch.sigmoid(self.decode(y)) * frames


class DeepSpeech(nn.Module):
    """DeepSpeech 2 in small: two strided convolutions over a spectrogram, a bidirectional
    tanh RNN over the frames, per-frame character log-probabilities for CTC."""

    def __init__(self, mels, channels, hidden, layers, classes):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 11, stride=(2, 2), padding=5, bias=False), nn.BatchNorm2d(channels),
            nn.Hardtanh(0, 20, inplace=True),
            nn.Conv2d(channels, channels, 11, stride=(2, 1), padding=5, bias=False), nn.BatchNorm2d(channels),
            nn.Hardtanh(0, 20, inplace=True))
        self.rnn = nn.RNN(channels * ((mels + 3) // 4), hidden, num_layers=layers, nonlinearity="tanh",
                          bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, spectrogram):  # (N, 1, mels, frames)
        f = self.conv(spectrogram)  # (N, C, mels/4, frames/2)
        n, c, m, t = f.shape
        y, _ = self.rnn(f.reshape(n, c * m, t).permute(2, 0, 1))  # over (frames/2, N, C*mels/4)
        return self.head(y).log_softmax(-1)  # (frames/2, N, classes)


class WaveRNNGenerator(nn.Module):
    """Autoregressive generation (WaveRNN style): a GRU takes one step at a time, N=1, and
    its output comes back through a small linear layer as the next input."""

    def __init__(self, features, hidden, steps):
        super().__init__()
        self.gru = nn.GRU(features, hidden)
        self.feedback = nn.Linear(hidden, features)
        self.steps = steps

    def forward(self, first):  # (1, 1, features)
        x, h, samples = first, None, []
        for _ in range(self.steps):
            y, h = self.gru(x, h)
            x = torch.tanh(self.feedback(y))
            samples.append(x)
        return torch.cat(samples)  # (steps, 1, features)


class TacotronDecoder(nn.Module):
    """A Tacotron 2 decoder loop: prenet, attention LSTM cell, additive attention over the
    encoder's outputs, decoder LSTM cell and a linear projection to the next mel frame,
    stepped in Python (teacher forcing off: each frame is fed back)."""

    def __init__(self, mels, prenet, memory_size, attention, hidden, steps):
        super().__init__()
        self.mels, self.hidden, self.steps = mels, hidden, steps
        self.prenet = nn.Sequential(nn.Linear(mels, prenet), nn.ReLU(), nn.Linear(prenet, prenet), nn.ReLU())
        self.attention_rnn = nn.LSTMCell(prenet + memory_size, hidden)
        self.query = nn.Linear(hidden, attention, bias=False)
        self.keys = nn.Linear(memory_size, attention)
        self.energy = nn.Linear(attention, 1, bias=False)
        self.decoder_rnn = nn.LSTMCell(hidden + memory_size, hidden)
        self.project = nn.Linear(hidden + memory_size, mels)

    def forward(self, memory):  # (N, L, memory_size): the encoder's outputs
        n = memory.shape[0]
        keys = self.keys(memory)
        frame = memory.new_zeros(n, self.mels)
        context = memory.new_zeros(n, memory.shape[2])
        h1 = c1 = h2 = c2 = memory.new_zeros(n, self.hidden)
        frames = []
        for _ in range(self.steps):
            h1, c1 = self.attention_rnn(torch.cat([self.prenet(frame), context], 1), (h1, c1))
            energies = self.energy(torch.tanh(self.query(h1).unsqueeze(1) + keys)).squeeze(2)
            context = torch.bmm(energies.softmax(1).unsqueeze(1), memory).squeeze(1)
            h2, c2 = self.decoder_rnn(torch.cat([h1, context], 1), (h2, c2))
            frame = self.project(torch.cat([h2, context], 1))
            frames.append(frame)
        return torch.stack(frames, 1)  # (N, steps, mels)


class CellLoop(nn.Module):
    """An LSTMCell stepped over a sequence in Python, one frame at a time, the state
    carried by hand (as decoders and streaming models do), and a linear read-out."""

    def __init__(self, features, hidden, outputs):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.readout = nn.Linear(hidden, outputs)

    def forward(self, frames):  # (T, N, features)
        state, hs = None, []
        for frame in frames:
            state = self.cell(frame, state)
            hs.append(state[0])
        return self.readout(torch.stack(hs))  # (T, N, outputs)


def _ctc_loss(log_probs, target):
    labels, input_lengths, label_lengths = target
    return F.ctc_loss(log_probs, labels, input_lengths, label_lengths)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model at its full and its tiny (test) sizes.

    ``build(sizes, generator)`` returns the model and its inputs; ``target(sizes,
    generator)`` what a training step's ``loss(output, target)`` compares with.
    """
    name: str
    modes: tuple
    sizes: dict  # "full" / "tiny" -> constructor and input sizes
    build: object
    describe: object  # sizes -> the shapes in words, for the printed table
    target: object = None
    loss: object = None
    notes: tuple = field(default=())
    agreement_rtol: float = AGREEMENT_RTOL


def _build_crnn(s, g):
    model = CRNN(s["channels"], s["hidden"], s["classes"])
    return model, (torch.randn(s["batch"], 1, 32, s["width"], generator=g),)


def _build_crnn_int8(s, g):
    """The CRNN as a user serves it after torch's dynamic quantization: its LSTMs int8."""
    model, inputs = _build_crnn(s, g)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notes on its migration to torchao
        model = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    return model, inputs


def _build_forecaster(s, g):
    model = GRUForecaster(s["features"], s["hidden"], s["horizon"])
    return model, (torch.randn(s["batch"], s["T"], s["features"], generator=g),)


def _build_separator(s, g):
    model = BiLSTMSeparator(s["bins"], s["rnn_input"], s["hidden"])
    return model, (torch.rand(s["T"], s["batch"], s["bins"], generator=g),)


def _build_deepspeech(s, g):
    model = DeepSpeech(s["mels"], s["channels"], s["hidden"], s["layers"], s["classes"])
    return model, (torch.randn(s["batch"], 1, s["mels"], s["frames"], generator=g),)


def _deepspeech_target(s, g):
    frames_out = (s["frames"] + 1) // 2
    label_lengths = torch.randint(1, s["label_length"] + 1, (s["batch"],), generator=g)
    labels = torch.randint(1, s["classes"], (s["batch"], s["label_length"]), generator=g)  # 0 is CTC's blank
    return labels, torch.full((s["batch"],), frames_out, dtype=torch.long), label_lengths


def _build_wavernn(s, g):
    model = WaveRNNGenerator(s["features"], s["hidden"], s["steps"])
    return model, (torch.randn(1, 1, s["features"], generator=g),)


def _build_cell_loop(s, g):
    model = CellLoop(s["features"], s["hidden"], s["outputs"])
    return model, (torch.randn(s["T"], s["batch"], s["features"], generator=g),)


def _build_tacotron(s, g):
    model = TacotronDecoder(s["mels"], s["prenet"], s["memory_size"], s["attention"], s["hidden"], s["steps"])
    return model, (torch.randn(s["batch"], s["memory_length"], s["memory_size"], generator=g),)


# crnn_int8 is the same model as crnn, quantized.
_CRNN_SIZES = {"full": dict(width=1000, batch=1, channels=(64, 128, 256, 256, 512), hidden=256, classes=37),
               "tiny": dict(width=64, batch=1, channels=(4, 8, 8, 8, 8), hidden=16, classes=5)}

MODELS = {spec.name: spec for spec in [
    ModelSpec(
        "crnn", ("inference",),
        _CRNN_SIZES,
        _build_crnn,
        lambda s: (f"image 1x32x{s['width']}, N={s['batch']}; 5 x (conv3x3+BN+ReLU+maxpool) "
                   f"{'-'.join(map(str, s['channels']))} ch; BiLSTM({s['channels'][-1]}, {s['hidden']}) "
                   f"+ linear + BiLSTM({s['hidden']}, {s['hidden']}) over T={s['width'] // 4} columns; "
                   f"linear to {s['classes']} classes")),
    ModelSpec(
        "crnn_int8", ("inference",),
        _CRNN_SIZES,
        _build_crnn_int8,
        lambda s: (f"crnn with its two BiLSTMs quantized by torch's quantize_dynamic (int8 weights); "
                   f"accelerate() runs them on lstmfast's int8 kernels with the same weights"),
        agreement_rtol=INT8_AGREEMENT_RTOL),
    ModelSpec(
        "gru_forecaster", ("training",),
        {"full": dict(batch=32, T=48, features=8, hidden=128, horizon=12),
         "tiny": dict(batch=4, T=6, features=3, hidden=8, horizon=2)},
        _build_forecaster,
        lambda s: (f"N={s['batch']}, T={s['T']}, {s['features']} features; GRU({s['features']}, "
                   f"{s['hidden']}, 2 layers) + linear to {s['horizon']} steps; MSE, Adam"),
        target=lambda s, g: torch.randn(s["batch"], s["horizon"], generator=g),
        loss=F.mse_loss),
    ModelSpec(
        "bilstm3", ("inference",),
        {"full": dict(T=200, batch=1, bins=512, rnn_input=256, hidden=512),
         "tiny": dict(T=8, batch=1, bins=12, rnn_input=6, hidden=8)},
        _build_separator,
        lambda s: (f"T={s['T']}, N={s['batch']}, {s['bins']} bins; linear to {s['rnn_input']}, "
                   f"BiLSTM({s['rnn_input']}, {s['hidden']}, 3 layers), linear + sigmoid mask")),
    ModelSpec(
        "deepspeech", ("inference", "training"),
        {"full": dict(batch=4, mels=80, frames=200, channels=32, hidden=1024, layers=2, classes=29,
                      label_length=40),
         "tiny": dict(batch=2, mels=8, frames=16, channels=2, hidden=8, layers=2, classes=5, label_length=3)},
        _build_deepspeech,
        lambda s: (f"N={s['batch']}, {s['mels']} mels x {s['frames']} frames; 2 x conv11x11+BN ({s['channels']} ch); "
                   f"tanh BiRNN({s['channels'] * ((s['mels'] + 3) // 4)}, {s['hidden']}, {s['layers']} layers) "
                   f"over T={(s['frames'] + 1) // 2}; linear to {s['classes']}, CTC loss, Adam"),
        target=_deepspeech_target, loss=_ctc_loss),
    ModelSpec(
        "wavernn_gen", ("inference",),
        {"full": dict(features=32, hidden=512, steps=1000),
         "tiny": dict(features=3, hidden=8, steps=20)},
        _build_wavernn,
        lambda s: (f"{s['steps']} steps of GRU({s['features']}, {s['hidden']}) at T=1, N=1, "
                   f"output fed back through linear({s['hidden']}, {s['features']}) + tanh")),
    ModelSpec(
        "tacotron_dec", ("inference", "training"),
        {"full": dict(batch=4, mels=80, prenet=256, memory_size=512, memory_length=100, attention=128,
                      hidden=1024, steps=100),
         "tiny": dict(batch=2, mels=4, prenet=6, memory_size=5, memory_length=7, attention=3, hidden=8, steps=10)},
        _build_tacotron,
        lambda s: (f"{s['steps']} steps at N={s['batch']}: prenet, LSTMCell({s['prenet'] + s['memory_size']}, "
                   f"{s['hidden']}), additive attention over {s['memory_length']} encoder steps, "
                   f"LSTMCell({s['hidden'] + s['memory_size']}, {s['hidden']}), linear to {s['mels']} mels; "
                   f"MSE against a target spectrogram, Adam"),
        target=lambda s, g: torch.randn(s["batch"], s["steps"], s["mels"], generator=g),
        loss=F.mse_loss),
    ModelSpec(
        "cell_loop", ("inference", "training"),
        {"full": dict(T=100, batch=1, features=256, hidden=256, outputs=16),
         "tiny": dict(T=5, batch=1, features=3, hidden=4, outputs=2)},
        _build_cell_loop,
        lambda s: (f"{s['T']} steps of LSTMCell({s['features']}, {s['hidden']}) at N={s['batch']} in a "
                   f"Python loop, linear to {s['outputs']}; MSE, Adam"),
        target=lambda s, g: torch.randn(s["T"], s["batch"], s["outputs"], generator=g),
        loss=F.mse_loss),
]}


def build(name, tiny):
    """The model ``name`` with its seeded random weights, its inputs and its training target."""
    spec = MODELS[name]
    sizes = spec.sizes["tiny" if tiny else "full"]
    torch.manual_seed(MODEL_SEED)
    generator = torch.Generator().manual_seed(INPUT_SEED)
    model, inputs = spec.build(sizes, generator)
    target = spec.target(sizes, generator) if spec.target is not None else None
    return model, inputs, target


def rnn_modules(model):
    return [m for m in model.modules() if isinstance(m, RNN_TYPES)]


def accelerated_count(model):
    """How many RNN modules ``accelerate`` made lstmfast ones (the rest run torch's code)."""
    return sum(type(m).__module__.startswith("lstmfast") for m in rnn_modules(model))
