// SPDX-License-Identifier: GPL-2.0
/* block_device.bd_openers is atomic_t (6.0+) */
#include <linux/blkdev.h>
static __maybe_unused int dbd_probe(struct block_device *b) { return atomic_read(&b->bd_openers); }
