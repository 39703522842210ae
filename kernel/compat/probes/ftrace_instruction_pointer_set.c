// SPDX-License-Identifier: GPL-2.0
/* ftrace_instruction_pointer_set() (5.16 .. 6.6) */
#include <linux/ftrace.h>
static __maybe_unused void dbd_probe(struct ftrace_regs *fr) { ftrace_instruction_pointer_set(fr, 0UL); }
