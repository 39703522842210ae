// SPDX-License-Identifier: GPL-2.0
/* ftrace callbacks receive struct ftrace_regs * (5.11+) instead of struct pt_regs * */
#include <linux/ftrace.h>
static void dbd_cb(unsigned long ip, unsigned long pip, struct ftrace_ops *op, struct ftrace_regs *fr) { }
static __maybe_unused ftrace_func_t dbd_probe = dbd_cb;
