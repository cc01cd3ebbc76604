"""Text classification with a bidirectional LSTM and attention pooling, via lstmfast.torch.

No text corpus ships inside a PyPI package that fits here, so the sentences are
generated, by rules stated here so the task can be reasoned about:

* the vocabulary has four topics (sport, weather, cooking, computing) of 12
  keywords each, and 60 neutral filler words;
* a sentence has 12 to 40 words. Its label is the topic with the MOST keywords
  in it: that topic appears 2 to 4 times, each other topic strictly fewer times
  (0 up to one less), and fillers make up the rest, in random order;
* so no single word decides the class: the model has to count keywords across
  the whole sentence, in sentences of different lengths.

Sentences go in as a PackedSequence (lengths in any order), through an embedding,
a 1-layer bidirectional `lstmfast.torch.LSTM`, attention pooling over the valid
steps (a learned score per step, softmax, weighted sum) and a linear classifier.

    python examples/bilstm_attention.py            # full run
    python examples/bilstm_attention.py --quick    # a short run (used by the tests)
"""

import argparse
import time

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmfast.torch as lt

TOPICS = {
    "sport": "goal match team coach league score referee stadium player season trophy keeper".split(),
    "weather": "rain storm cloud sunny forecast wind snow thunder humid breeze frost drizzle".split(),
    "cooking": "oven recipe bake flour simmer spice kitchen sauce dough grill roast pepper".split(),
    "computing": "server compile kernel memory thread cache python network disk binary code cpu".split(),
}
FILLERS = ("the a an and but then today yesterday we they it is was very quite really about "
           "after before during with without our their some many few more less this that "
           "there here again still just also maybe perhaps often never always soon later "
           "early late big small new old good bad long short high low first last next other").split()
PAD = 0
VOCAB = ["<pad>"] + sorted({w for ws in TOPICS.values() for w in ws} | set(FILLERS))
INDEX = {w: i for i, w in enumerate(VOCAB)}


def make_dataset(rng, count):
    topics = list(TOPICS)
    sentences, labels = [], []
    for _ in range(count):
        label = int(rng.integers(len(topics)))
        winner = int(rng.integers(2, 5))
        words = list(rng.choice(TOPICS[topics[label]], size=winner))
        for k, topic in enumerate(topics):
            if k != label:
                words += list(rng.choice(TOPICS[topic], size=int(rng.integers(0, winner))))
        length = max(len(words), int(rng.integers(12, 41)))
        words += list(rng.choice(FILLERS, size=length - len(words)))
        rng.shuffle(words)
        sentences.append([INDEX[w] for w in words])
        labels.append(label)
    lengths = np.array([len(s) for s in sentences])
    tokens = np.full((count, lengths.max()), PAD, dtype=np.int64)
    for i, s in enumerate(sentences):
        tokens[i, :len(s)] = s
    return torch.from_numpy(tokens), torch.from_numpy(lengths), torch.tensor(labels)


class BiLSTMAttention(torch.nn.Module):
    def __init__(self, vocab, classes, embed=32, hidden=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed, padding_idx=PAD)
        self.lstm = lt.LSTM(embed, hidden, bidirectional=True)
        self.score = torch.nn.Sequential(torch.nn.Linear(2 * hidden, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, 1, bias=False))
        self.out = torch.nn.Linear(2 * hidden, classes)

    def forward(self, tokens, lengths):          # tokens (N, T), lengths (N,)
        packed = pack_padded_sequence(self.embed(tokens).transpose(0, 1), lengths, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], total_length=tokens.shape[1])  # (T, N, 2H)
        scores = self.score(states).squeeze(-1)  # (T, N)
        valid = torch.arange(tokens.shape[1])[:, None] < lengths[None, :]
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=0)
        return self.out((weights.unsqueeze(-1) * states).sum(0))


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        tokens, lengths, labels = data
        acc = (model(tokens, lengths).argmax(1) == labels).float().mean().item()
    model.train()
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--plot", default="bilstm_attention.png", help="where to save the curves")
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 12)
    n_train = 600 if args.quick else 6000

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = make_dataset(rng, n_train)
    test = make_dataset(rng, 2000)
    model = BiLSTMAttention(len(VOCAB), len(TOPICS))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = {"loss": [], "train_acc": [], "test_acc": []}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_train)
        total = 0.0
        for i in range(0, n_train, 64):
            batch = order[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(train[0][batch], train[1][batch]), train[2][batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        history["loss"].append(total / n_train)
        history["train_acc"].append(evaluate(model, train))
        history["test_acc"].append(evaluate(model, test))
        print(f"epoch {epoch:3d}  loss {history['loss'][-1]:.4f}  train {history['train_acc'][-1]:.3f}  "
              f"test {history['test_acc'][-1]:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"test accuracy {history['test_acc'][-1]:.3f} over {len(TOPICS)} classes (chance 0.25)")
    save_plot(history, args.plot)
    return history["test_acc"][-1]


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
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle("BiLSTM + attention on the keyword-majority task (lstmfast.torch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
