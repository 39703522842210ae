// SPDX-License-Identifier: GPL-2.0
/* block_device.bd_super (<= 6.5) */
#include <linux/blkdev.h>
static __maybe_unused struct super_block * dbd_probe(struct block_device *b) { return b->bd_super; }
