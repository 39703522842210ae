// SPDX-License-Identifier: GPL-2.0
/* /dev/datto-ctl: ioctl dispatch and argument validation (spec §2). */
#include <linux/miscdevice.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/capability.h>
#include <linux/build_bug.h>
#include "dattobd.h"

DEFINE_MUTEX(dbd_ctl_mutex);
struct dbd_tracer **dbd_minors;

static_assert(sizeof(struct setup_params) == 40);
static_assert(sizeof(struct reload_params) == 32);
static_assert(sizeof(struct transition_snap_params) == 24);
static_assert(sizeof(struct reconfigure_params) == 16);
static_assert(sizeof(struct expand_cow_file_params) == 16);
static_assert(sizeof(struct reconfigure_auto_expand_params) == 24);
static_assert(sizeof(struct dattobd_info) == 8272);
static_assert(offsetof(struct dattobd_info, cow) == 64);
static_assert(offsetof(struct dattobd_info, version) == 8256);
static_assert(IOCTL_SETUP_SNAP == 0x40289101);
static_assert(IOCTL_DATTOBD_INFO == 0xa0509108);
static_assert(IOCTL_GET_FREE == 0x80049109);
static_assert(IOCTL_RECONFIGURE_AUTO_EXPAND == 0x4018910b);

/* copy a user string: NULL -> EINVAL, > PATH_MAX incl. NUL -> EINVAL */
static int dbd_get_string(const char __user *u, char **out)
{
	char *s;

	*out = NULL;
	if (!u)
		return -EINVAL;
	s = strndup_user(u, PATH_MAX);
	if (IS_ERR(s))
		return PTR_ERR(s);
	*out = s;
	return 0;
}

static long dbd_ioctl_setup(void __user *arg)
{
	struct setup_params p;
	char *bdev = NULL, *cow = NULL;
	int err;

	if (copy_from_user(&p, arg, sizeof(p)))
		return -EFAULT;
	err = dbd_get_string(p.bdev, &bdev);
	if (!err)
		err = dbd_get_string(p.cow, &cow);
	if (!err) {
		LOG_DEBUG("ioctl setup snapshot: minor %u bdev %s cow %s falloc %lu cache %lu",
			  p.minor, bdev, cow, p.fallocated_space, p.cache_size);
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_setup_snap(p.minor, bdev, cow, p.fallocated_space, p.cache_size);
		mutex_unlock(&dbd_ctl_mutex);
	}
	kfree(bdev);
	kfree(cow);
	return err;
}

static long dbd_ioctl_reload(void __user *arg, bool snap)
{
	struct reload_params p;
	char *bdev = NULL, *cow = NULL;
	int err;

	if (copy_from_user(&p, arg, sizeof(p)))
		return -EFAULT;
	err = dbd_get_string(p.bdev, &bdev);
	if (!err)
		err = dbd_get_string(p.cow, &cow);
	if (!err) {
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_reload(p.minor, bdev, cow, p.cache_size, snap);
		mutex_unlock(&dbd_ctl_mutex);
	}
	kfree(bdev);
	kfree(cow);
	return err;
}

static long dbd_ioctl_minor(void __user *arg, int (*fn)(unsigned int))
{
	unsigned int minor;
	int err;

	if (copy_from_user(&minor, arg, sizeof(minor)))
		return -EFAULT;
	mutex_lock(&dbd_ctl_mutex);
	err = fn(minor);
	mutex_unlock(&dbd_ctl_mutex);
	return err;
}

static long dbd_ioctl_trans_snap(void __user *arg)
{
	struct transition_snap_params p;
	char *cow = NULL;
	int err;

	if (copy_from_user(&p, arg, sizeof(p)))
		return -EFAULT;
	err = dbd_get_string(p.cow, &cow);
	if (!err) {
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_transition_snap(p.minor, cow, p.fallocated_space);
		mutex_unlock(&dbd_ctl_mutex);
	}
	kfree(cow);
	return err;
}

static long dbd_ioctl_info(void __user *arg)
{
	struct dattobd_info *info;
	struct dbd_tracer *tr;
	int err = 0;

	info = kmalloc(sizeof(*info), GFP_KERNEL);
	if (!info)
		return -ENOMEM;
	if (copy_from_user(info, arg, sizeof(*info))) {
		kfree(info);
		return -EFAULT;
	}
	mutex_lock(&dbd_ctl_mutex);
	if (info->minor >= dbd_max_minors) {
		err = -EINVAL;
	} else {
		tr = dbd_minors[info->minor];
		if (!tr)
			err = -ENOENT;
		else
			dbd_fill_info(tr, info);
	}
	mutex_unlock(&dbd_ctl_mutex);
	if (!err && copy_to_user(arg, info, sizeof(*info)))
		err = -EFAULT;
	kfree(info);
	return err;
}

static long dbd_ioctl_get_free(void __user *arg)
{
	unsigned int i;
	int found = -ENOENT;

	mutex_lock(&dbd_ctl_mutex);
	for (i = 0; i < dbd_max_minors; i++) {
		if (!dbd_minors[i]) {
			found = i;
			break;
		}
	}
	mutex_unlock(&dbd_ctl_mutex);
	if (found < 0)
		return found;
	if (copy_to_user(arg, &found, sizeof(found)))
		return -EFAULT;
	return 0;
}

static long dbd_ctl_ioctl(struct file *f, unsigned int cmd, unsigned long uarg)
{
	void __user *arg = (void __user *)uarg;
	long err;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;

	switch (cmd) {
	case IOCTL_SETUP_SNAP:
		err = dbd_ioctl_setup(arg);
		break;
	case IOCTL_RELOAD_SNAP:
		err = dbd_ioctl_reload(arg, true);
		break;
	case IOCTL_RELOAD_INC:
		err = dbd_ioctl_reload(arg, false);
		break;
	case IOCTL_DESTROY:
		err = dbd_ioctl_minor(arg, dbd_destroy);
		break;
	case IOCTL_TRANSITION_INC:
		err = dbd_ioctl_minor(arg, dbd_transition_inc);
		break;
	case IOCTL_TRANSITION_SNAP:
		err = dbd_ioctl_trans_snap(arg);
		break;
	case IOCTL_RECONFIGURE: {
		struct reconfigure_params p;

		if (copy_from_user(&p, arg, sizeof(p)))
			return -EFAULT;
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_reconfigure(p.minor, p.cache_size);
		mutex_unlock(&dbd_ctl_mutex);
		break;
	}
	case IOCTL_DATTOBD_INFO:
		err = dbd_ioctl_info(arg);
		break;
	case IOCTL_GET_FREE:
		err = dbd_ioctl_get_free(arg);
		break;
	case IOCTL_EXPAND_COW_FILE: {
		struct expand_cow_file_params p;

		if (copy_from_user(&p, arg, sizeof(p)))
			return -EFAULT;
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_expand(p.minor, p.size);
		mutex_unlock(&dbd_ctl_mutex);
		break;
	}
	case IOCTL_RECONFIGURE_AUTO_EXPAND: {
		struct reconfigure_auto_expand_params p;

		if (copy_from_user(&p, arg, sizeof(p)))
			return -EFAULT;
		mutex_lock(&dbd_ctl_mutex);
		err = dbd_auto_expand(p.minor, p.step_size, p.reserved_space);
		mutex_unlock(&dbd_ctl_mutex);
		break;
	}
	default:
		err = -EINVAL;
	}
	if (err)
		LOG_DEBUG("ioctl %#x returned %ld", cmd, err);
	return err;
}

static const struct file_operations dbd_ctl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = dbd_ctl_ioctl,
	.compat_ioctl = dbd_ctl_ioctl,
	.open = nonseekable_open,
	.llseek = noop_llseek,
};

static struct miscdevice dbd_ctl_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "datto-ctl",
	.fops = &dbd_ctl_fops,
};

int dbd_ctl_init(void)
{
	return misc_register(&dbd_ctl_dev);
}

void dbd_ctl_exit(void)
{
	misc_deregister(&dbd_ctl_dev);
}
