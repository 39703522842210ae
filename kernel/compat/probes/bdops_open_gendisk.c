// SPDX-License-Identifier: GPL-2.0
/* open(struct gendisk *, blk_mode_t) / release(struct gendisk *) (6.5+) */
#include <linux/blkdev.h>
static int dbd_open(struct gendisk *d, blk_mode_t m) { return 0; }
static void dbd_rel(struct gendisk *d) { }
static __maybe_unused const struct block_device_operations dbd_probe = { .open = dbd_open, .release = dbd_rel };
