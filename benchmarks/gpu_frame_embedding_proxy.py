#!/usr/bin/env python3
"""GPU cost of frame embeddings, measured with a proxy: torchvision's ResNet-152.

The lent GPU machines carry PyTorch but no TensorFlow (a TensorFlow GPU wheel is far over
what can be carried there), so this measures the same network (ResNet-152, 224 x 224,
pooled 2048-d output, random weights: speed does not depend on them) in PyTorch, as the
throughput a well-fed GPU gives for the ImageNet-embedding stage. docs/scaling.md turns it
into GPU-hours for AudioSet. Not a test; not part of the package.

  python3 benchmarks/gpu_frame_embedding_proxy.py [--batch=256] [--iters=20]
"""

import argparse
import time

import torch
import torchvision


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args()
  device = "cuda"
  torch.backends.cudnn.benchmark = True
  print(torch.cuda.get_device_name(0), "torch", torch.__version__)
  model = torchvision.models.resnet152(weights=None)
  model.fc = torch.nn.Identity()  # the 2048-d pooled embedding, as the paper uses
  model = model.eval().to(device).to(memory_format=torch.channels_last)
  x = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
  for dtype in (torch.float32, torch.bfloat16, torch.float16):
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype,
                                                enabled=dtype != torch.float32):
      for _ in range(3):
        model(x)
      torch.cuda.synchronize()
      start = time.time()
      for _ in range(args.iters):
        out = model(x)
      torch.cuda.synchronize()
      seconds = time.time() - start
    images = args.batch * args.iters / seconds
    print(f"{str(dtype):15s} batch {args.batch}: {images:8.0f} images/s "
          f"({images / 64:6.1f} clips/s at 64 frames), output {tuple(out.shape)}")


if __name__ == "__main__":
  main()
