// SPDX-License-Identifier: GPL-2.0
/* bdev_nr_sectors() helper (5.11+) */
#include <linux/blkdev.h>
static __maybe_unused sector_t dbd_probe(struct block_device *b) { return bdev_nr_sectors(b); }
