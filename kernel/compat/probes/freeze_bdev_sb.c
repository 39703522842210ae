// SPDX-License-Identifier: GPL-2.0
/* struct super_block *freeze_bdev(bdev) + thaw_bdev(bdev, sb) (<= 5.10) */
#include <linux/blkdev.h>
#include <linux/fs.h>
static __maybe_unused int dbd_probe(struct block_device *b) {
	struct super_block *sb = freeze_bdev(b);
	return thaw_bdev(b, sb);
}
