// SPDX-License-Identifier: GPL-2.0
/* dattobd: module init/exit and parameters. */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include "dattobd.h"

int dbd_debug;
unsigned int dbd_max_minors = 24;
unsigned long dbd_cow_max_memory_default = 300UL * 1024 * 1024;
unsigned int dbd_cow_fallocate_percentage_default = 10;
static int dbd_may_hook_syscalls = 1;

module_param_named(debug, dbd_debug, int, 0644);
MODULE_PARM_DESC(debug, "enables debug logging");
module_param_named(max_snap_devices, dbd_max_minors, uint, 0444);
MODULE_PARM_DESC(max_snap_devices, "maximum number of tracers (0 means 24, at most 255)");
module_param_named(cow_max_memory_default, dbd_cow_max_memory_default, ulong, 0);
MODULE_PARM_DESC(cow_max_memory_default, "default index cache size in bytes");
module_param_named(cow_fallocate_percentage_default, dbd_cow_fallocate_percentage_default, uint, 0);
MODULE_PARM_DESC(cow_fallocate_percentage_default, "default COW file size in percent of the device");
module_param_named(may_hook_syscalls, dbd_may_hook_syscalls, int, 0444);
MODULE_PARM_DESC(may_hook_syscalls, "accepted for compatibility, unused");

static int __init dbd_init(void)
{
	int err;

	if (!dbd_max_minors) {
		dbd_max_minors = 24;
	} else if (dbd_max_minors > 255) {
		LOG_WARN("max_snap_devices %u too large, using 255", dbd_max_minors);
		dbd_max_minors = 255;
	}
	LOG_DEBUG("module init, max_snap_devices %u", dbd_max_minors);

	dbd_wq = alloc_workqueue("datto_wq", WQ_UNBOUND, 0);
	if (!dbd_wq)
		return -ENOMEM;
	err = dbd_snapdev_init();
	if (err) {
		LOG_ERROR(err, "error registering block major");
		goto fail_wq;
	}
	dbd_minors = kcalloc(dbd_max_minors, sizeof(*dbd_minors), GFP_KERNEL);
	if (!dbd_minors) {
		err = -ENOMEM;
		goto fail_blk;
	}
	err = dbd_proc_init();
	if (err) {
		LOG_ERROR(err, "error creating /proc/datto-info");
		goto fail_tbl;
	}
	err = dbd_ctl_init();
	if (err) {
		LOG_ERROR(err, "error registering /dev/datto-ctl");
		goto fail_proc;
	}
	err = dbd_hook_init();
	if (err)
		goto fail_ctl;
	err = dbd_lifecycle_init();
	if (err)
		goto fail_hook;
	return 0;

fail_hook:
	dbd_hook_exit();
fail_ctl:
	dbd_ctl_exit();
fail_proc:
	dbd_proc_exit();
fail_tbl:
	kfree(dbd_minors);
fail_blk:
	dbd_snapdev_exit();
fail_wq:
	destroy_workqueue(dbd_wq);
	return err;
}

static void __exit dbd_exit(void)
{
	LOG_DEBUG("module exit");
	dbd_ctl_exit();
	dbd_destroy_all();
	dbd_lifecycle_exit();
	flush_workqueue(dbd_wq);
	dbd_hook_exit();
	dbd_proc_exit();
	kfree(dbd_minors);
	dbd_snapdev_exit();
	destroy_workqueue(dbd_wq);
}

module_init(dbd_init);
module_exit(dbd_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Kernel module for block device snapshots and incremental tracking");
MODULE_VERSION(DBD_VERSION);
