// SPDX-License-Identifier: GPL-2.0
/* block_device.bd_start_sect (5.11+) instead of bd_part->start_sect */
#include <linux/blkdev.h>
static __maybe_unused sector_t dbd_probe(struct block_device *b) { return b->bd_start_sect; }
