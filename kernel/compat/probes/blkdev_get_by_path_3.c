// SPDX-License-Identifier: GPL-2.0
/* blkdev_get_by_path(path, fmode_t, holder) + blkdev_put(bdev, fmode_t) (<= 6.4) */
#include <linux/blkdev.h>
static __maybe_unused void dbd_probe(void) {
	struct block_device *b = blkdev_get_by_path("/x", FMODE_READ, NULL);
	blkdev_put(b, FMODE_READ);
}
