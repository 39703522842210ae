// SPDX-License-Identifier: GPL-2.0
/* bdev_freeze()/bdev_thaw() (6.8+) */
#include <linux/blkdev.h>
static __maybe_unused int dbd_probe(struct block_device *b) {
	int r = bdev_freeze(b);
	return r ? r : bdev_thaw(b);
}
