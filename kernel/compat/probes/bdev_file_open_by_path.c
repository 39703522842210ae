// SPDX-License-Identifier: GPL-2.0
/* bdev_file_open_by_path() + file_bdev() (6.9+) */
#include <linux/blkdev.h>
#include <linux/fs.h>
static __maybe_unused struct block_device * dbd_probe(void) {
	struct file *f = bdev_file_open_by_path("/x", BLK_OPEN_READ, NULL, NULL);
	return file_bdev(f);
}
