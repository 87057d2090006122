"""Automatic captioning and tagging of image folders (BLIP captions, WD14 tags).

`common` holds what both share (image listing, the background decode pool, the batch loop and the
run summary); `blip` and `wd14` hold the models; `tags` holds WD14's pure-python tag selection.
Modules here import torch / transformers / onnxruntime only inside functions.
"""
