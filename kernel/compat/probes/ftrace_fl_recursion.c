// SPDX-License-Identifier: GPL-2.0
/* FTRACE_OPS_FL_RECURSION (5.11+) instead of FTRACE_OPS_FL_RECURSION_SAFE */
#include <linux/ftrace.h>
static __maybe_unused unsigned long dbd_probe(void) { return FTRACE_OPS_FL_RECURSION; }
