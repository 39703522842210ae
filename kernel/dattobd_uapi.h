/* SPDX-License-Identifier: GPL-2.0 */
/* ioctl ABI of the Datto Block Driver 0.12.x (x86_64 LP64 layouts). */
#ifndef DATTOBD_UAPI_H
#define DATTOBD_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/limits.h>

#define DATTO_IOCTL_MAGIC 0x91

struct setup_params {
	char __user *bdev;
	char __user *cow;
	unsigned long fallocated_space;
	unsigned long cache_size;
	unsigned int minor;
};

struct reload_params {
	char __user *bdev;
	char __user *cow;
	unsigned long cache_size;
	unsigned int minor;
};

struct transition_snap_params {
	char __user *cow;
	unsigned long fallocated_space;
	unsigned int minor;
};

struct reconfigure_params {
	unsigned long cache_size;
	unsigned int minor;
};

struct expand_cow_file_params {
	__u64 size;
	unsigned int minor;
};

struct reconfigure_auto_expand_params {
	__u64 step_size;
	__u64 reserved_space;
	unsigned int minor;
};

struct dattobd_info {
	unsigned int minor;
	unsigned long state;
	int error;
	unsigned long cache_size;
	__u64 falloc_size;
	__u64 seqid;
	__u8 uuid[16];
	char cow[PATH_MAX];
	char bdev[PATH_MAX];
	__u64 version;
	__u64 nr_changed_blocks;
};

#define IOCTL_SETUP_SNAP _IOW(DATTO_IOCTL_MAGIC, 1, struct setup_params)
#define IOCTL_RELOAD_SNAP _IOW(DATTO_IOCTL_MAGIC, 2, struct reload_params)
#define IOCTL_RELOAD_INC _IOW(DATTO_IOCTL_MAGIC, 3, struct reload_params)
#define IOCTL_DESTROY _IOW(DATTO_IOCTL_MAGIC, 4, unsigned int)
#define IOCTL_TRANSITION_INC _IOW(DATTO_IOCTL_MAGIC, 5, unsigned int)
#define IOCTL_TRANSITION_SNAP _IOW(DATTO_IOCTL_MAGIC, 6, struct transition_snap_params)
#define IOCTL_RECONFIGURE _IOW(DATTO_IOCTL_MAGIC, 7, struct reconfigure_params)
#define IOCTL_DATTOBD_INFO _IOR(DATTO_IOCTL_MAGIC, 8, struct dattobd_info)
#define IOCTL_GET_FREE _IOR(DATTO_IOCTL_MAGIC, 9, int)
#define IOCTL_EXPAND_COW_FILE _IOW(DATTO_IOCTL_MAGIC, 10, struct expand_cow_file_params)
#define IOCTL_RECONFIGURE_AUTO_EXPAND _IOW(DATTO_IOCTL_MAGIC, 11, struct reconfigure_auto_expand_params)

#endif
