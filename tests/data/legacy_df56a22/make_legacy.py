"""Writes small artefacts with the code of commit df56a22 (before the issue-15 restructuring)."""
import os, sys, wave
import numpy as np
import keras

from av_sound_tf import models, fusion, training, labels, export, tflite
from data_prep import inputs, prepare

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
C = 3
ref = {}
log_mel = rng.normal(size=[2, 96, 64]).astype(np.float32)
audio = models.MILConvNet(num_classes=C, num_frames=96, width=0.05)
audio.compile(training.ReplicaMeanAdam(1e-3), keras.losses.BinaryCrossentropy())
audio.fit(log_mel, np.eye(C, dtype=np.float32)[:2], epochs=1, verbose=0)
audio.save(f"{out}/audio_mil.keras")
ref["audio_mil"] = audio.predict(log_mel, verbose=0)
student = models.MobileMIL(num_classes=C, num_frames=96, width=0.25)
student.save(f"{out}/mobile_mil.keras")
ref["mobile_mil"] = student.predict(log_mel, verbose=0)
emb = rng.normal(size=[2, 16]).astype(np.float32)
visual = models.VisualDNN(num_classes=C, embedding_dim=16, width=0.01)
visual.save(f"{out}/visual_dnn.keras")
ref["visual_dnn"] = visual.predict(emb, verbose=0)
stats = dict(audio_mean=np.full(C, 0.3), audio_variance=np.full(C, 0.04),
             visual_mean=np.full(C, 0.4), visual_variance=np.full(C, 0.05))
fin = {"h_audio": rng.random([2, C]).astype(np.float32),
       "h_visual": rng.random([2, C]).astype(np.float32),
       "audio_present": np.ones([2, 1], np.float32), "visual_present": np.ones([2, 1], np.float32)}
fm = fusion.FusionModel(C, "attention", **stats, attention_hidden=8, transform_hidden=8)
fm(fin)
fm.save(f"{out}/attention_fusion.keras")
ref["attention_fusion"] = np.asarray(fm(fin, training=False))
np.savez(f"{out}/reference_outputs.npz", log_mel=log_mel, embedding=emb,
         **{f"fusion_{k}": v for k, v in fin.items()}, **ref)
# Prepared data: three synthetic tones (written here, no third-party audio).
media_dir = os.path.join(out, "media_tmp")
os.makedirs(media_dir, exist_ok=True)
rows = []
for i, f0 in enumerate((440, 660, 880)):
  t = np.arange(16000) / 16000
  y = (0.3 * np.sin(2 * np.pi * f0 * t) * 32767).astype(np.int16)
  p = os.path.join(media_dir, f"tone{i}.wav")
  with wave.open(p, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(y.tobytes())
  rows.append(f"tone{i}.wav,{['low', 'mid', 'high'][i]}")
open(os.path.join(media_dir, "list.csv"), "w").write("path,labels\n" + "\n".join(rows) + "\n")
found = inputs.from_file_list(os.path.join(media_dir, "list.csv"))
prepare.prepare(found, prepare.PrepareConfig(output_dir=os.path.join(out, "prepared")), num_workers=0)
labels.LabelMap([f"/m/{i}" for i in range(C)], ["low", "mid", "high"]).to_csv(f"{out}/labels.csv")
res = export.export_saved_model(f"{out}/audio_mil.keras", f"{out}/labels.csv", f"{out}/serving",
                                visual_model_path=None)
print(res["path"])
paths = tflite.convert(f"{out}/audio_mil.keras", f"{out}/labels.csv", f"{out}/tflite", ("float32",), 1.0)
print(paths)
