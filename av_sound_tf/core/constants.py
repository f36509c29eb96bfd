"""Constants every stage shares; each is spelled here only.

* `PACKAGE`: the Keras registration package of every custom layer, model and optimizer.
  Saved ``.keras`` files name their classes ``av_sound_tf>ClassName``: never rename it.
* `SAMPLE_RATE`: the audio the whole system works on (paper Sec. 3.1): 16 kHz mono.
* `HOP_LENGTH`, `FRAMES_PER_SECOND`: the log-mel frame rate, 10 ms hops = 100 frames/s.
"""

PACKAGE = "av_sound_tf"
SAMPLE_RATE = 16000
HOP_LENGTH = 160  # samples: 10 ms at 16 kHz
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
