"""Files and storage: weights (`weights`), training checkpoints (`checkpoint`), the run lock
(`lock`), image decoding (`images`) and the fenced mmseg .pth reader (`pth`)."""
