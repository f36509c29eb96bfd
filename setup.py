"""av-sound-tf: audiovisual learning of sounds from weakly labeled video (Keras 3 / TF)."""

import glob

import setuptools

setuptools.setup(
    name="av-sound-tf",
    version="0.1.0",
    description=("Audio MIL ConvNet, visual DNN and attention fusion for weakly labeled "
                 "sound recognition (Fayek & Kumar, IJCAI 2020), with tf.data pipelines."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["av_sound_tf", "av_sound_tf.*", "data_prep",
                                               "data_prep.*"]),
    scripts=sorted(glob.glob("bin/*")),
    # Pins: tensorflow-io 0.37.1 is the last release and is built against TF 2.17 (its
    # native ops fail to load on 2.18+); numpy 2 and protobuf 5 break TF 2.17.
    install_requires=[
        "tensorflow==2.17.1",
        "tensorflow-io==0.37.1",
        "keras>=3.5,<3.7",
        "tensorflow-hub>=0.16,<0.17",
        "numpy>=1.26,<2",
        "protobuf>=4.21,<5",
        "setuptools<81",  # tensorflow-hub 0.16.1 imports pkg_resources
        "scikit-learn>=1.3",
        "absl-py>=2.1",
        "av>=12",
        "soxr>=0.3",  # resampling: 3.3x faster than swresample (docs/benchmarks.md)
        "soundfile>=0.12",  # WAV/FLAC/Ogg Vorbis/AIFF decoding (core/media.py)
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "librosa>=0.10"],
        # Distributed preparation (Dataflow, Flink, Spark, DirectRunner); see BUILD.md.
        "beam": ["apache-beam==2.77.0"],
        # TFLite Model Metadata (bin/export --tflite_dir refuses to convert without it);
        # see requirements.txt and BUILD.md for why this version and these pins.
        "tflite": ["mediapipe==0.10.21", "jax==0.5.3", "jaxlib==0.5.3",
                   "opencv-contrib-python==4.11.0.86"],
    },
)
