// SPDX-License-Identifier: GPL-2.0
/* BIO_REMAPPED flag marks bios whose sector was already made absolute */
#include <linux/bio.h>
static __maybe_unused bool dbd_probe(struct bio *b) { return bio_flagged(b, BIO_REMAPPED); }
