"""The Table-1 audio network (av_sound_tf.modeling.models.MILConvNet) in PyTorch, for
benchmarks/peers_benchmark.py only: torch is a benchmark dependency (requirements-bench.txt),
never a runtime one, and nothing in av_sound_tf imports this file.

The same layers as MILConvNet: B1-B4 two 3x3 convolutions (no bias) with batch norm
(epsilon 1e-3, Keras momentum 0.99 = PyTorch momentum 0.01) and ReLU, then max pooling
(4, 2, 2, 2); B5 2048 3x2 filters without padding; B6, B7 dense 1024 with batch norm and
ReLU; sigmoid segment scores; clip scores = their mean over segments. Input [batch, frames,
64]. `copy_keras_weights` loads a Keras MILConvNet's weights, so that the benchmark can
check that both networks give the same scores.
"""

import numpy as np
import torch
from torch import nn

# Table 1 (the same numbers as models.CONV_BLOCKS, B5_FILTERS, B5_KERNEL, B6/B7_FILTERS).
CONV_BLOCKS = (("b1", 64, 4), ("b2", 128, 2), ("b3", 256, 2), ("b4", 512, 2))
B5_FILTERS, B5_KERNEL, HIDDEN = 2048, (3, 2), 1024


def _scaled(filters, width):
  return max(4, int(round(filters * width)))


class _ConvBN(nn.Module):

  def __init__(self, cin, cout, kernel, padding):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class _DenseBN(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.dense = nn.Linear(cin, cout, bias=False)
    self.bn = nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01)

  def forward(self, x):  # [B, S, F]
    return torch.relu(self.bn(self.dense(x).transpose(1, 2)).transpose(1, 2))


class Table1(nn.Module):
  """MILConvNet(num_classes, width) in PyTorch: log-mel [B, T, 64] -> clip scores [B, C]."""

  def __init__(self, num_classes=527, width=1.0):
    super().__init__()
    self.layers = nn.ModuleDict()
    cin = 1
    for block, filters, pool in CONV_BLOCKS:
      f = _scaled(filters, width)
      self.layers[f"{block}_1"] = _ConvBN(cin, f, 3, 1)
      self.layers[f"{block}_2"] = _ConvBN(f, f, 3, 1)
      self.layers[f"{block}_pool"] = nn.MaxPool2d(pool)
      cin = f
    self.layers["b5"] = _ConvBN(cin, _scaled(B5_FILTERS, width), B5_KERNEL, 0)
    self.layers["b6"] = _DenseBN(_scaled(B5_FILTERS, width), _scaled(HIDDEN, width))
    self.layers["b7"] = _DenseBN(_scaled(HIDDEN, width), _scaled(HIDDEN, width))
    self.segment_scores = nn.Linear(_scaled(HIDDEN, width), num_classes)

  def forward(self, log_mel):
    x = log_mel[:, None]  # [B, 1, T, F]
    for name, layer in self.layers.items():
      if name == "b6":
        x = x.flatten(2).transpose(1, 2)  # [B, 2048, S, 1] -> [B, S, 2048]
      x = layer(x)
    return torch.sigmoid(self.segment_scores(x)).mean(dim=1)


def copy_keras_weights(model: Table1, weights: dict):
  """Loads {Keras layer name: [arrays]} of a MILConvNet (kernels, then gamma, beta, moving
  mean, moving variance) into `model`."""
  def put(param, array):
    with torch.no_grad():
      param.copy_(torch.from_numpy(np.ascontiguousarray(array)))

  for name, layer in model.layers.items():
    if isinstance(layer, nn.MaxPool2d):
      continue
    if isinstance(layer, _ConvBN):
      put(layer.conv.weight, weights[f"{name}_conv"][0].transpose(3, 2, 0, 1))
    else:
      put(layer.dense.weight, weights[f"{name}_dense"][0].T)
    gamma, beta, mean, variance = weights[f"{name}_bn"]
    for param, array in ((layer.bn.weight, gamma), (layer.bn.bias, beta),
                         (layer.bn.running_mean, mean), (layer.bn.running_var, variance)):
      put(param, array)
  kernel, bias = weights["segment_scores"]
  put(model.segment_scores.weight, kernel.T)
  put(model.segment_scores.bias, bias)
