// SPDX-License-Identifier: GPL-2.0
/* bio names its target partition through bio->bi_bdev (5.12+); else bi_disk+bi_partno */
#include <linux/bio.h>
static __maybe_unused struct block_device * dbd_probe(struct bio *b) { return b->bi_bdev; }
