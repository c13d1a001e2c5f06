; Inno Setup 6.3+ script: the Helix Desktop installer for Windows 10/11 x64 (and Windows on ARM, x64 emulation).
; Packs the PyInstaller folder packaging\dist\Helix, so build that first:
;   powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1      (builds the folder, then runs this)
;   iscc /DAppVersion=0.1.0 /DVariant=directml packaging\helix.iss          (this script alone)
; Installs per user by default (no admin prompt; the wizard offers all users), adds a Start-menu entry,
; an optional desktop icon and an uninstaller. Settings and logs live in %APPDATA%\Helix\Helix Desktop;
; the uninstaller asks before deleting them (a silent uninstall keeps them, without asking).
; Variant (directml | rocm | cuda | cpu) only names the installer: the torch inside is whatever build.py put in
; the folder (rocm: AMD's ROCm torch from the index given to build_windows.ps1 -TorchIndexUrl).

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef Variant
  #define Variant "directml"
#endif
#define AppName "Helix Desktop"
#define AppExe "Helix.exe"
#define AppFolder "dist\Helix"

#if !FileExists(AddBackslash(SourcePath) + AppFolder + "\" + AppExe)
  #error "packaging\dist\Helix\Helix.exe is missing: build the app first (python packaging\build.py --variant directml)"
#endif

[Setup]
AppId={{6C1F0B7E-3A2D-4E8B-9F41-8D2C7A5E0B13}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion} ({#Variant})
AppPublisher=Helix
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0
OutputDir=dist\installer
OutputBaseFilename=HelixDesktop-{#AppVersion}-{#Variant}-setup
SetupIconFile=..\resources\icons\helix.ico
UninstallDisplayIcon={app}\{#AppExe}
UninstallDisplayName={#AppName}
Compression=lzma2
SolidCompression=yes
WizardStyle=modern
CloseApplications=yes

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[InstallDelete]
; an upgrade replaces the whole bundle, so no file of an older torch or Qt is left behind
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "{#AppFolder}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#AppExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

[Code]
// Settings and logs are the user's, not the install's: ask before deleting them. A silent uninstall
// (/SILENT, /VERYSILENT: upgrades, scripted removal) keeps them and never stops at a prompt.
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
var
  DataDir: String;
begin
  if UninstallSilent then Exit;
  if CurUninstallStep = usPostUninstall then
  begin
    DataDir := ExpandConstant('{userappdata}\Helix\Helix Desktop');
    if DirExists(DataDir) then
      if SuppressibleMsgBox('Also delete your Helix Desktop settings and logs?' + #13#10 + DataDir,
                            mbConfirmation, MB_YESNO or MB_DEFBUTTON2, IDNO) = IDYES then
        DelTree(DataDir, True, True, True);
  end;
end;
