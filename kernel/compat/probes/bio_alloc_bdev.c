// SPDX-License-Identifier: GPL-2.0
/* bio_alloc(bdev, nr_vecs, opf, gfp) (5.18+) instead of bio_alloc(gfp, nr_vecs) */
#include <linux/bio.h>
static __maybe_unused struct bio * dbd_probe(struct block_device *b) { return bio_alloc(b, 1, REQ_OP_READ, GFP_NOIO); }
