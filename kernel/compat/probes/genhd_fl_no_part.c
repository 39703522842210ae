// SPDX-License-Identifier: GPL-2.0
/* GENHD_FL_NO_PART (6.0+) instead of GENHD_FL_NO_PART_SCAN */
#include <linux/blkdev.h>
static __maybe_unused int dbd_probe(void) { return GENHD_FL_NO_PART; }
