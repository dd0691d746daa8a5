# $marker
# Starts the mtls-sidecar daemon and tray at logon for the current user: two values under
# HKCU\...\Run. No administrator rights are needed. Run with -Uninstall to remove them.
param([switch]$$Uninstall)
$$ErrorActionPreference = 'Stop'
$$RunKey = 'HKCU:\Software\Microsoft\Windows\CurrentVersion\Run'
$$Entries = [ordered]@{
    'mtls-sidecar' = '$daemon_command'
    'mtls-sidecar-tray' = '$tray_command'
}
foreach ($$Name in $$Entries.Keys) {
    if ($$Uninstall) {
        Remove-ItemProperty -Path $$RunKey -Name $$Name -ErrorAction SilentlyContinue
    } else {
        Set-ItemProperty -Path $$RunKey -Name $$Name -Value $$Entries[$$Name]
    }
}
