// SPDX-License-Identifier: GPL-2.0
/* int freeze_bdev(bdev) + int thaw_bdev(bdev) (5.11 .. 6.7) */
#include <linux/blkdev.h>
#include <linux/fs.h>
static __maybe_unused int dbd_probe(struct block_device *b) {
	int r = freeze_bdev(b);
	return r ? r : thaw_bdev(b);
}
