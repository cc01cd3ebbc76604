"""Write the ONNX models that docs/onnx.md times against ONNX Runtime.

    python benchmarks/onnx_nodes.py models/
    for f in models/*.onnx; do
        python -m lstmfast.bench --onnx "$f" --onnx-shape 100,8 --threads 1 2
    done

One recurrent node each (I = H = 256), written by ``layer.to_onnx``: an LSTM and a GRU
with ONNX's options, and ONNX Runtime's ``quantize_dynamic`` of a plain LSTM (a
``DynamicQuantizeLSTM`` node). Needs onnx and onnxruntime.
"""

import logging
import os
import sys
import tempfile

import lstmfast

LAYERS = {
    "lstm_reverse": lambda: lstmfast.LSTM(256, 256, seed=0, reverse=True),
    "lstm_hardsigmoid": lambda: lstmfast.LSTM(256, 256, seed=0,
                                              activations=["hardsigmoid", "tanh", "tanh"]),
    "lstm_clip_coupled": lambda: lstmfast.LSTM(256, 256, seed=0, clip=3.0, input_forget=True),
    "gru_reverse": lambda: lstmfast.GRU(256, 256, seed=0, reverse=True,
                                        linear_before_reset=False),
    "gru_keras": lambda: lstmfast.GRU(256, 256, seed=0, activations=["hardsigmoid", "tanh"],
                                      linear_before_reset=False),
}


def main(folder):
    from onnxruntime.quantization import quantize_dynamic

    os.makedirs(folder, exist_ok=True)
    for name, make in LAYERS.items():
        make().eval().to_onnx(os.path.join(folder, name + ".onnx"))
    with tempfile.TemporaryDirectory() as scratch:
        plain = os.path.join(scratch, "lstm.onnx")
        lstmfast.LSTM(256, 256, seed=0).eval().to_onnx(plain)
        logging.disable(logging.WARNING)  # its advice to pre-process a one-node model
        quantize_dynamic(plain, os.path.join(folder, "lstm_dynamic_quantize.onnx"),
                         reduce_range=True)
    print(f"wrote {len(LAYERS) + 1} models to {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
